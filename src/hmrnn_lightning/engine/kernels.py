"""The HM-LSTM step as Triton kernels, one program per batch row: :func:`step_forward` and
:func:`step_backward` compute what :mod:`~hmrnn_lightning.engine.pointwise` does, plus the
estimator (``MODE``: :mod:`~hmrnn_lightning.engine.plan`'s constants), the bottom-up term's layer
norm and the rules of :mod:`~hmrnn_lightning.cells.operations` (COPY keeps ``z``; the top
layer's ``z`` is the ``top_z`` given). A row is read as four ``H`` slices plus the logit; rows
are ``ROW`` apart (:func:`~hmrnn_lightning.engine.plan.padded_row`), pad columns masked.

Launch them by keyword; a pointer a switch turns off is None. This module imports only Triton,
so ``bench/compile_kernels.py`` loads it by path under another Triton.
"""

from __future__ import annotations

try:  # optional: the GPU path's kernels (pip install 'hmrnn-lightning[gpu]')
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None


def block_size(hidden: int) -> int:
    """The kernels' ``BLOCK``: ``hidden`` rounded up to a power of two."""
    return 1 << (int(hidden) - 1).bit_length()


def num_warps(hidden: int) -> int:
    """Warps per program: one program holds a few dozen row vectors of ``BLOCK`` floats (the
    backward with layer norm, most), so wider layers get more threads to keep them in
    registers: 4 up to ``H = 512``, 8 at 1024, 16 beyond."""
    return min(16, max(4, block_size(hidden) // 128))


def triton_kernels():
    """``(forward, backward)``; ImportError naming the extra when Triton is missing."""
    if triton is None:
        raise ImportError("the Triton kernels need Triton: pip install 'hmrnn-lightning[gpu]'")
    return step_forward, step_backward


if triton is not None:

    @triton.jit
    def _sigm(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _load5(ptr, offs, mask, H: tl.constexpr):
        a = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(ptr + H + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(ptr + 2 * H + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(ptr + 3 * H + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(ptr + 4 * H).to(tl.float32)
        return a, b, c, d, e

    @triton.jit
    def _store5(ptr, offs, mask, a, b, c, d, e, H: tl.constexpr):
        tl.store(ptr + offs, a, mask=mask)
        tl.store(ptr + H + offs, b, mask=mask)
        tl.store(ptr + 2 * H + offs, c, mask=mask)
        tl.store(ptr + 3 * H + offs, d, mask=mask)
        tl.store(ptr + 4 * H, e)

    @triton.jit
    def _norm5(x0, x1, x2, x3, x4, mask, eps, H: tl.constexpr):
        """Layer-norm statistics of a ``4H + 1`` row: ``(x^ per part, 1/std)``."""
        n = 4 * H + 1
        mean = (tl.sum(tl.where(mask, x0 + x1 + x2 + x3, 0.0), axis=0) + x4) / n
        d0 = tl.where(mask, x0 - mean, 0.0)
        d1 = tl.where(mask, x1 - mean, 0.0)
        d2 = tl.where(mask, x2 - mean, 0.0)
        d3 = tl.where(mask, x3 - mean, 0.0)
        d4 = x4 - mean
        var = (tl.sum(d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3, axis=0) + d4 * d4) / n
        rstd = 1.0 / tl.sqrt(var + eps)
        return d0 * rstd, d1 * rstd, d2 * rstd, d3 * rstd, d4 * rstd, rstd

    @triton.jit
    def _norm_cell(c, mask, eps, H: tl.constexpr):
        mean = tl.sum(tl.where(mask, c, 0.0), axis=0) / H
        d = tl.where(mask, c - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / H + eps)
        return d * rstd, rstd

    @triton.jit
    def _bottom_up(below_ptr, gb_ptr, bb_ptr, offs, mask, eps, H: tl.constexpr, NORM_BELOW: tl.constexpr):
        """The bottom-up term of the row, normalised where ``NORM_BELOW``."""
        r0, r1, r2, r3, r4 = _load5(below_ptr, offs, mask, H)
        if NORM_BELOW:
            n0, n1, n2, n3, n4, _ = _norm5(r0, r1, r2, r3, r4, mask, eps, H)
            g0, g1, g2, g3, g4 = _load5(gb_ptr, offs, mask, H)
            b0, b1, b2, b3, b4 = _load5(bb_ptr, offs, mask, H)
            r0, r1, r2, r3, r4 = n0 * g0 + b0, n1 * g1 + b1, n2 * g2 + b2, n3 * g3 + b3, n4 * g4 + b4
        return r0, r1, r2, r3, r4

    @triton.jit
    def _estimate(logit, given_ptr, slope_ptr, row, MODE: tl.constexpr):
        """The estimator's decision ``e``: MODE 0 given, 1 step, 2 Bernoulli from the given
        uniform noise in [0, 1), 3 soft (:mod:`~hmrnn_lightning.engine.plan`'s constants)."""
        if MODE == 0:
            e = tl.load(given_ptr + row).to(tl.float32)
        else:
            slope = tl.load(slope_ptr).to(tl.float32)
            p = tl.minimum(tl.maximum((slope * logit + 1.0) * 0.5, 0.0), 1.0)
            if MODE == 1:
                e = tl.where(p > 0.5, 1.0, 0.0)
            elif MODE == 2:
                e = tl.where(tl.load(given_ptr + row).to(tl.float32) < p, 1.0, 0.0)
            else:
                e = p
        return e

    @triton.jit
    def step_forward(
        s_ptr, base_ptr, base_stride, below_ptr, gb_ptr, bb_ptr, c_prev_ptr, h_prev_ptr, zp_ptr, zb_ptr, gc_ptr,
        bc_ptr, given_ptr, slope_ptr, c_ptr, h_ptr, z_ptr, e_ptr, logit_ptr, own_ptr, own_stride, up_ptr,
        up_stride, down_ptr, down_stride, below_eps, cell_eps, top_z,
        H: tl.constexpr, BLOCK: tl.constexpr, ROW: tl.constexpr, HAS_BASE: tl.constexpr, HAS_BELOW: tl.constexpr,
        BELOW_GATED: tl.constexpr, NORM_BELOW: tl.constexpr, NORM_CELL: tl.constexpr, TOP: tl.constexpr,
        MODE: tl.constexpr, WRITE_OWN: tl.constexpr, WRITE_UP: tl.constexpr, WRITE_DOWN: tl.constexpr,
    ):
        """``s`` holds the merged product (plus the bias unless ``HAS_BASE``: then the kernel adds
        ``base``, the bias at ``base_stride`` 0 or one row per batch row); ``below`` the raw
        bottom-up product (layer norm). Writes the full pre-activation into ``s``, ``c``, ``h``,
        ``z``, ``e``, the logit, and ``h`` into the inputs of the products that read it next:
        ``own`` (its next step), ``up`` (the layer below's next step, gated by ``z_below``) and
        ``down`` (the layer above's bottom-up block without layer norm, gated by the new ``z``)."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        s0, s1, s2, s3, s4 = _load5(s_ptr + row * ROW, offs, mask, H)
        if HAS_BASE:
            q0, q1, q2, q3, q4 = _load5(base_ptr + row * base_stride, offs, mask, H)
            s0, s1, s2, s3, s4 = s0 + q0, s1 + q1, s2 + q2, s3 + q3, s4 + q4
        zp = tl.load(zp_ptr + row).to(tl.float32)
        zb = 1.0
        if BELOW_GATED:
            zb = tl.load(zb_ptr + row).to(tl.float32)
        if HAS_BELOW:
            r0, r1, r2, r3, r4 = _bottom_up(below_ptr + row * ROW, gb_ptr, bb_ptr, offs, mask, below_eps, H, NORM_BELOW)
            s0, s1, s2, s3, s4 = s0 + zb * r0, s1 + zb * r1, s2 + zb * r2, s3 + zb * r3, s4 + zb * r4
        _store5(s_ptr + row * ROW, offs, mask, s0, s1, s2, s3, s4, H)
        f, i, o, g = _sigm(s0), _sigm(s1), _sigm(s2), _tanh(s3)
        u = (1.0 - zp) * zb
        k = (1.0 - zp) * (1.0 - zb)
        c_prev = tl.load(c_prev_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        h_prev = tl.load(h_prev_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        c = (k + u * f) * c_prev + (u + zp) * (i * g)
        n = c
        if NORM_CELL:
            chat, _ = _norm_cell(c, mask, cell_eps, H)
            n = chat * tl.load(gc_ptr + offs, mask=mask, other=0.0) + tl.load(bc_ptr + offs, mask=mask, other=0.0)
        h = k * h_prev + (1.0 - k) * (o * _tanh(n))
        tl.store(c_ptr + row * H + offs, c, mask=mask)
        tl.store(h_ptr + row * H + offs, h, mask=mask)
        if WRITE_OWN:
            tl.store(own_ptr + row * own_stride + offs, h, mask=mask)
        if WRITE_UP:
            tl.store(up_ptr + row * up_stride + offs, zb * h, mask=mask)
        if TOP:
            tl.store(z_ptr + row, zp * 0.0 + top_z)
        else:
            e = _estimate(s4, given_ptr, slope_ptr, row, MODE)
            tl.store(e_ptr + row, e)
            tl.store(logit_ptr + row, s4)
            z = k * zp + (1.0 - k) * e  # COPY keeps z (operations.carry_boundary)
            tl.store(z_ptr + row, z)
            if WRITE_DOWN:
                tl.store(down_ptr + row * down_stride + offs, z * h, mask=mask)

    @triton.jit
    def _bottom_up_backward(below_ptr, gb_ptr, bb_ptr, dgb_ptr, dbb_ptr, offs, mask, zb, ds_f, ds_i, ds_o, ds_g,
                            d_logit, eps, H: tl.constexpr, BELOW_GATED: tl.constexpr):
        """The normalised bottom-up term backwards: adds the norm's parameter gradients into this
        row's ``dgb``/``dbb``, overwrites ``below`` with the gated gradient of the raw product,
        and returns the gate's gradient ``<LN(raw), ds>`` (0 when ungated)."""
        r0, r1, r2, r3, r4 = _load5(below_ptr, offs, mask, H)
        n0, n1, n2, n3, n4, rstd = _norm5(r0, r1, r2, r3, r4, mask, eps, H)
        g0, g1, g2, g3, g4 = _load5(gb_ptr, offs, mask, H)
        b0, b1, b2, b3, b4 = _load5(bb_ptr, offs, mask, H)
        dzb = 0.0
        if BELOW_GATED:
            dzb = tl.sum(tl.where(mask, (n0 * g0 + b0) * ds_f + (n1 * g1 + b1) * ds_i
                                  + (n2 * g2 + b2) * ds_o + (n3 * g3 + b3) * ds_g, 0.0), axis=0)
            dzb += (n4 * g4 + b4) * d_logit
        y0, y1, y2, y3, y4 = zb * ds_f, zb * ds_i, zb * ds_o, zb * ds_g, zb * d_logit
        q0, q1, q2, q3, q4 = _load5(dgb_ptr, offs, mask, H)
        _store5(dgb_ptr, offs, mask, q0 + y0 * n0, q1 + y1 * n1, q2 + y2 * n2, q3 + y3 * n3, q4 + y4 * n4, H)
        q0, q1, q2, q3, q4 = _load5(dbb_ptr, offs, mask, H)
        _store5(dbb_ptr, offs, mask, q0 + y0, q1 + y1, q2 + y2, q3 + y3, q4 + y4, H)
        x0 = tl.where(mask, y0 * g0, 0.0)
        x1 = tl.where(mask, y1 * g1, 0.0)
        x2 = tl.where(mask, y2 * g2, 0.0)
        x3 = tl.where(mask, y3 * g3, 0.0)
        x4 = y4 * g4
        nw = 4 * H + 1
        m1 = (tl.sum(x0 + x1 + x2 + x3, axis=0) + x4) / nw
        m2 = (tl.sum(x0 * n0 + x1 * n1 + x2 * n2 + x3 * n3, axis=0) + x4 * n4) / nw
        _store5(below_ptr, offs, mask, rstd * (x0 - m1 - n0 * m2), rstd * (x1 - m1 - n1 * m2),
                rstd * (x2 - m1 - n2 * m2), rstd * (x3 - m1 - n3 * m2), rstd * (x4 - m1 - n4 * m2), H)
        return dzb

    @triton.jit
    def _cell_backward(c_ptr, gc_ptr, bc_ptr, dgc_ptr, dbc_ptr, row, offs, mask, o, dh_new, eps,
                       H: tl.constexpr, NORM_CELL: tl.constexpr):
        """From ``dh`` (less COPY's part) to ``d c_t`` through ``o tanh(N(c))``: returns
        ``(d c_t, o tanh(N(c)), the output gate's ds)``; adds the cell norm's parameter gradients."""
        c_t = tl.load(c_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        n = c_t
        if NORM_CELL:
            gc = tl.load(gc_ptr + offs, mask=mask, other=0.0)
            chat, c_rstd = _norm_cell(c_t, mask, eps, H)
            n = chat * gc + tl.load(bc_ptr + offs, mask=mask, other=0.0)
        tc = _tanh(n)
        ds_o = tc * dh_new * o * (1.0 - o)
        d_n = o * dh_new * (1.0 - tc * tc)
        if NORM_CELL:
            at = row * H + offs  # this row's own accumulators
            tl.store(dgc_ptr + at, tl.load(dgc_ptr + at, mask=mask, other=0.0) + d_n * chat, mask=mask)
            tl.store(dbc_ptr + at, tl.load(dbc_ptr + at, mask=mask, other=0.0) + d_n, mask=mask)
            dxh = tl.where(mask, d_n * gc, 0.0)
            d_c = c_rstd * (dxh - tl.sum(dxh, axis=0) / H - chat * (tl.sum(dxh * chat, axis=0) / H))
        else:
            d_c = d_n
        return d_c, o * tc, ds_o

    @triton.jit
    def _gradients_in(h_ptr, dh_ptr, gh_ptr, drec_ptr, drec_stride, dxa_ptr, dxa_stride, dxb_ptr, dxb_stride, dz_ptr,
                      gz_ptr, z_ptr, row, offs, mask, zb, H: tl.constexpr, TOP: tl.constexpr, HAS_GH: tl.constexpr,
                      HAS_GZ: tl.constexpr, HAS_DREC: tl.constexpr, HAS_DXA: tl.constexpr, HAS_DXB: tl.constexpr):
        """``(dh, dz, dz_below so far)``: the accumulators plus the outputs' gradients and the blocks
        of the ungated products ``ds W`` that read ``h_t``: ``drec`` (its own next step's recurrent
        term), ``dxa`` (the layer below's next top-down term, gated by ``z_below``), ``dxb`` (the
        layer above's bottom-up term without layer norm, gated by this layer's ``z``)."""
        h_t = tl.load(h_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GH:
            dh += tl.load(gh_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DREC:  # the next step's recurrent term read h_t
            dh += tl.load(drec_ptr + row * drec_stride + offs, mask=mask, other=0.0).to(tl.float32)
        dzb = 0.0
        if HAS_DXA:  # the layer below's top-down term read h_t, gated by z_below
            dxa = tl.load(dxa_ptr + row * dxa_stride + offs, mask=mask, other=0.0).to(tl.float32)
            dh += zb * dxa
            dzb += tl.sum(h_t * dxa, axis=0)
        dz = 0.0
        if not TOP:
            dz = tl.load(dz_ptr + row).to(tl.float32)
            if HAS_GZ:
                dz += tl.load(gz_ptr + row).to(tl.float32)
            if HAS_DXB:  # the layer above's bottom-up term read h_t, gated by this layer's z
                dxb = tl.load(dxb_ptr + row * dxb_stride + offs, mask=mask, other=0.0).to(tl.float32)
                dh += tl.load(z_ptr + row).to(tl.float32) * dxb
                dz += tl.sum(h_t * dxb, axis=0)
        return dh, dz, dzb

    @triton.jit
    def step_backward(
        s_ptr, below_ptr, gb_ptr, bb_ptr, dgb_ptr, dbb_ptr, c_ptr, c_prev_ptr, h_prev_ptr, h_ptr, zp_ptr, zb_ptr,
        e_ptr, slope_ptr, gc_ptr, bc_ptr, dgc_ptr, dbc_ptr, gh_ptr, dh_ptr, dc_ptr, dz_ptr, gz_ptr, glogit_ptr,
        drec_ptr, drec_stride, dxa_ptr, dxa_stride, dxb_ptr, dxb_stride, dzb_ptr, z_ptr, below_eps, cell_eps,
        H: tl.constexpr, BLOCK: tl.constexpr, ROW: tl.constexpr, HAS_BELOW: tl.constexpr,
        BELOW_GATED: tl.constexpr, NORM_CELL: tl.constexpr, TOP: tl.constexpr,
        MODE: tl.constexpr, HAS_GH: tl.constexpr, HAS_GZ: tl.constexpr, HAS_GLOGIT: tl.constexpr,
        HAS_DREC: tl.constexpr, HAS_DXA: tl.constexpr, HAS_DXB: tl.constexpr, FLUSH_GRAD: tl.constexpr,
    ):
        """One layer and step backwards. ``dh``, ``dc``, ``dz`` accumulate the gradients reaching
        ``h``, ``c``, ``z`` (:func:`_gradients_in` adds the rest); overwrites ``s`` with ``ds``,
        ``below`` with its gated gradient, ``dh`` with COPY's part of ``dh_prev``, ``dc`` with
        ``dc_prev``, ``dz`` with ``dz_prev`` (less the top-down gate's part, which the layer above
        adds; without ``FLUSH_GRAD`` only COPY's carry's part, as ``z_prev`` is then a constant
        in the operations' weights), and adds ``dz_below`` into ``dzb``."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        s0, s1, s2, s3, s4 = _load5(s_ptr + row * ROW, offs, mask, H)
        zp = tl.load(zp_ptr + row).to(tl.float32)
        zb = 1.0
        if BELOW_GATED:
            zb = tl.load(zb_ptr + row).to(tl.float32)
        u = (1.0 - zp) * zb
        k = (1.0 - zp) * (1.0 - zb)
        f, i, o, g = _sigm(s0), _sigm(s1), _sigm(s2), _tanh(s3)
        dh, dz, dzb = _gradients_in(h_ptr, dh_ptr, gh_ptr, drec_ptr, drec_stride, dxa_ptr, dxa_stride, dxb_ptr,
                                    dxb_stride, dz_ptr, gz_ptr, z_ptr, row, offs, mask, zb, H, TOP, HAS_GH, HAS_GZ,
                                    HAS_DREC, HAS_DXA, HAS_DXB)
        c_prev = tl.load(c_prev_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        h_prev = tl.load(h_prev_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        dh_new = (1.0 - k) * dh
        d_c, h_new, ds_o = _cell_backward(c_ptr, gc_ptr, bc_ptr, dgc_ptr, dbc_ptr, row, offs, mask, o, dh_new, cell_eps,
                                          H, NORM_CELL)
        dk = tl.sum(tl.where(mask, (h_prev - h_new) * dh, 0.0), axis=0)
        dct = tl.load(dc_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32) + d_c
        ds_f = u * c_prev * dct * f * (1.0 - f)
        uz_dct = (u + zp) * dct
        ds_i = uz_dct * g * i * (1.0 - i)
        ds_g = uz_dct * i * (1.0 - g * g)
        ig = i * g
        du = tl.sum(tl.where(mask, (ig + f * c_prev) * dct, 0.0), axis=0)
        dzp = tl.sum(tl.where(mask, ig * dct, 0.0), axis=0)  # FLUSH's weight is z_prev itself
        dk += tl.sum(tl.where(mask, c_prev * dct, 0.0), axis=0)
        tl.store(dc_ptr + row * H + offs, (k + u * f) * dct, mask=mask)
        tl.store(dh_ptr + row * H + offs, k * dh, mask=mask)
        d_logit = 0.0
        carry = 0.0  # z_prev's gradient through COPY's carry alone
        if not TOP:
            carry = k * dz
            dzp += carry
            dk += (zp - tl.load(e_ptr + row).to(tl.float32)) * dz
            if MODE != 0:  # straight through the hard sigmoid: a / 2 where it is not clipped
                slope = tl.load(slope_ptr).to(tl.float32)
                q = (slope * s4 + 1.0) * 0.5
                d_logit = tl.where((q >= 0.0) & (q <= 1.0), (1.0 - k) * dz * slope * 0.5, 0.0)
            if HAS_GLOGIT:
                d_logit += tl.load(glogit_ptr + row).to(tl.float32)
        if BELOW_GATED:
            dzp += -zb * du - (1.0 - zb) * dk
            dzb += (1.0 - zp) * (du - dk)
        else:
            dzp += -du
        if FLUSH_GRAD:
            tl.store(dz_ptr + row, dzp)
        else:
            tl.store(dz_ptr + row, carry + zp * 0.0)  # a tensor even on the top layer
        _store5(s_ptr + row * ROW, offs, mask, ds_f, ds_i, ds_o, ds_g, d_logit, H)
        if HAS_BELOW:  # the bottom-up term of its own, normalised: d LN(raw) = z_below ds
            dzb += _bottom_up_backward(below_ptr + row * ROW, gb_ptr, bb_ptr, dgb_ptr + row * ROW, dbb_ptr + row * ROW,
                                       offs, mask, zb, ds_f, ds_i, ds_o, ds_g, d_logit, below_eps, H, BELOW_GATED)
        if BELOW_GATED:
            tl.store(dzb_ptr + row, tl.load(dzb_ptr + row) + dzb)
