"""Multi-layer stacks that consume a whole ``[batch, time, features]`` sequence.

The stack, not the LightningModule, owns the time loop, so a faster implementation can
replace the loop behind the same interface. :class:`HMStack` is the reference: one step
of one layer at a time, exactly the paper's equations.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from hmrnn_lightning.cells.base import HMCell
from hmrnn_lightning.cells.operations import TOP_LAYER_Z, carry_boundary
from hmrnn_lightning.engine import self_check
from hmrnn_lightning.engine.paths import FastPaths
from hmrnn_lightning.estimators.base import BoundaryEstimator

from hmrnn_lightning.states import LayerState, StackOutput, State, detach_state  # noqa: F401  (re-exported)

#: The values of :class:`HMStack`'s ``impl``.
IMPLS = ("auto", "reference", "sequence", "triton")
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


class RecurrentStack(nn.Module):
    """Interface of every stack.

    Args:
        input_size: features per step of the input sequence.
        hidden_sizes: hidden size of each layer, bottom first.
    """

    def __init__(self, input_size: int, hidden_sizes: list[int]) -> None:
        super().__init__()
        hidden_sizes = [int(h) for h in hidden_sizes]
        if not hidden_sizes or any(h <= 0 for h in hidden_sizes):
            raise ValueError(f"{type(self).__name__}: hidden_sizes must be a non-empty list of positive ints, got {hidden_sizes}")
        if int(input_size) <= 0:
            raise ValueError(f"{type(self).__name__}: input_size must be positive, got {input_size}")
        self.input_size = int(input_size)
        self.hidden_sizes = hidden_sizes

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    def initial_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> State:
        """Zeros; states are fp32 (fp64 when the input is fp64) whatever autocast does."""
        out = []
        for size in self.hidden_sizes:
            zeros = torch.zeros(batch_size, size, device=device, dtype=dtype)
            out.append(LayerState(zeros, zeros.clone(), torch.zeros(batch_size, device=device, dtype=dtype)))
        return out

    @staticmethod
    def state_dtype(x: Tensor) -> torch.dtype:
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def check_input(self, x: Tensor, state: State | None) -> State:
        """Validate shapes; return ``state`` or a fresh zero state."""
        if x.dim() != 3:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape [batch, time, {self.input_size}], got {tuple(x.shape)}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"{type(self).__name__}: input has {x.shape[-1]} features per step, the stack was built for {self.input_size}"
            )
        batch = x.shape[0]
        if state is None:
            return self.initial_state(batch, x.device, self.state_dtype(x))
        if len(state) != self.num_layers:
            raise ValueError(f"{type(self).__name__}: state has {len(state)} layers, the stack has {self.num_layers}")
        for l, (s, size) in enumerate(zip(state, self.hidden_sizes), start=1):
            if s.h.shape != (batch, size) or s.c.shape != (batch, size) or s.z.shape != (batch,):
                raise ValueError(
                    f"{type(self).__name__}: state of layer {l} has h {tuple(s.h.shape)}, c {tuple(s.c.shape)}, "
                    f"z {tuple(s.z.shape)}; expected h and c ({batch}, {size}) and z ({batch},) for this input "
                    f"(a state from another batch size?)"
                )
        return state

    def forward(self, x: Tensor, state: State | None = None, boundaries: Tensor | None = None) -> StackOutput:
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def step(self, x: Tensor, state: State | None = None) -> StackOutput:
        """One time step without gradients, for generation: ``x`` is ``[batch, input_size]``;
        the output has a time axis of length 1. Stacks with a faster path override :meth:`_step`."""
        if x.dim() != 2:
            raise ValueError(f"{type(self).__name__}.step: expected input of shape [batch, {self.input_size}], got {tuple(x.shape)}")
        return self._step(x, state)

    def _step(self, x: Tensor, state: State | None) -> StackOutput:
        return self.forward(x.unsqueeze(1), state)


#: cell options an :class:`HMStack` passes on, with the values that leave them out (today's cell)
CELL_OPTIONS = {"norm_placement": "bottom_up_and_cell", "flush_recurrent": True, "flush_gradient": True,
                "boundary_init": "uniform"}


def build_cells(
    cell_class: type[HMCell], input_size: int, hidden_sizes: list[int], layer_norm: bool, **options
) -> nn.ModuleList:
    """One cell per layer; ``options`` (keyword arguments of the cell class) go to every cell."""
    below = [input_size] + hidden_sizes[:-1]
    above: list[int | None] = list(hidden_sizes[1:]) + [None]
    return nn.ModuleList(cell_class(b, h, a, layer_norm, **options) for b, h, a in zip(below, hidden_sizes, above))


def cell_options(cell_class: type, cell: str, **values) -> dict:
    """The options among ``values`` that differ from :data:`CELL_OPTIONS`'s defaults, so a cell
    that does not know them (the HM-RNN, a plugin's) is built as before; one that is set for
    such a cell is an error naming it."""
    import inspect

    options = {k: v for k, v in values.items() if v != CELL_OPTIONS[k]}
    params = inspect.signature(cell_class).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        defaults = ", ".join(f"{k}: {CELL_OPTIONS[k]!r}" for k in unknown)
        raise ValueError(f"HMStack: cell {cell!r} ({cell_class.__name__}) does not take {', '.join(unknown)}; leave "
                         f"{'it' if len(unknown) == 1 else 'them'} at the default ({defaults}) or use a cell that takes "
                         f"{'it' if len(unknown) == 1 else 'them'}")
    return options


class HMStack(RecurrentStack):
    """A stack of HM layers with boundary detectors: the reference time loop.

    At each step, layers are updated bottom to top, so layer ``l`` sees ``h^{l-1}_t`` (just
    computed) and ``h^{l+1}_{t-1}`` (not yet updated). ``h^0_t = x_t`` and ``z^0_t = 1``.

    Choices where the paper is silent:
      * The top layer has no boundary detector (paper, below eq. 7) and its ``z`` is fixed
        at 0: it never flushes, it UPDATEs when the layer below ends a segment and COPYs
        otherwise.
      * In COPY ``z^l_t = z^l_{t-1}`` (which is 0, since COPY needs ``z^l_{t-1} = 0``): the
        detector is not re-evaluated because nothing is recomputed in COPY.
      * Boundaries do not always nest. After a FLUSH (``z^l_{t-1} = 1``) the layer computes
        at ``t`` and its detector decides ``z^l_t`` whether or not the layer below ended a
        segment at ``t``, as eq. 2 and the boundary equation say; so a layer can end a segment
        where the one below did not (measured: 8-18% of layer-2 steps in freshly initialised
        LayerNorm 3 x 128 stacks on PTB text).
        :class:`~hmrnn_lightning.metrics.BoundaryStatistics` logs the share as ``unnested/l{k}``.

    Args:
        input_size: features per input step (the embedding size).
        hidden_sizes: hidden size of each layer, bottom first.
        estimator: turns boundary logits into boundary states (shared by all layers).
        cell: registered cell name (``hm_lstm``, ``hm_rnn``, or a plugin's) or a dotted class path.
        layer_norm: use the LayerNorm variant of the cell.
        norm_placement: HM-LSTM only, with ``layer_norm``: ``bottom_up_and_cell`` (normalise the
            bottom-up term and the cell) or ``summed`` (one norm on the summed pre-activation); see
            :class:`~hmrnn_lightning.cells.HMLSTMCell`. An ablation: ``summed`` runs on the reference loop.
        flush_recurrent: HM-LSTM only: keep the recurrent term ``U h_{t-1}`` in the gates on FLUSH
            (eq. 5 as written); false drops it ("FLUSH completely erases all the previous states").
            An ablation: false runs on the reference loop.
        flush_gradient: let the straight-through gradient reach ``z^l_{t-1}`` through layer
            ``l``'s choice of operation at ``t`` (FLUSH or not; the paper's gradient). False cuts
            that one path, a loop whose gradient grew geometrically backwards in time in some
            seeds at initialisation (:func:`~hmrnn_lightning.cells.operations.select_operations`;
            in training it moved a blow-up to another seed and cost layer 2 the word ends); the
            boundary still learns through the layer above's UPDATE/COPY choice, the gates and
            COPY's carry. An ablation; every path runs either.
        boundary_init: ``uniform`` (the usual start) or ``below_only``: each layer's boundary unit
            starts with zero weights on its own past and on the layer above (the rows learn from
            zero), so the loop above has no gain at first
            (:class:`~hmrnn_lightning.cells.HMCell`; not in the paper). Only the start differs;
            every path runs it. Measured (docs/study.md): at initialisation the gradient grew in
            three seeds of nine with ``uniform`` (norm 803 at 100 steps in one) and in none with
            ``below_only``; on PTB without separators it ended 1,200 steps lower in all seven seeds
            tried; with separators level in BPC, but layer 2 found the word ends in one seed of
            five against three, so ``uniform`` stays the default.
        impl: ``reference`` (the readable loop below); ``sequence``
            (:mod:`hmrnn_lightning.engine.sequence`: one autograd function over the whole
            sequence with a hand-written backward, skipping closed rows; the CPU's fast path;
            HM-LSTM with or without layer norm, estimators without trainable parameters);
            ``triton`` (:mod:`hmrnn_lightning.engine.triton_window`: matrix products and
            Triton kernels, dense, no host synchronisation; the GPU's fast path; HM-LSTM with
            the step, Bernoulli or soft estimator; on a CPU only under ``TRITON_INTERPRET=1``);
            or ``auto``: ``triton`` on a GPU where it applies, else ``sequence`` where it
            applies, else ``reference``. :meth:`active_impl` says which. All give the same
            results up to summation order (Bernoulli draws its noise differently on ``triton``).
        compile: retired with the per-step path it compiled; accepted (and ignored, with a
            warning when true) so that configs and checkpoints written before 0.2.0 still load.
        cuda_graph: on the Triton path, capture each training window in a CUDA graph and replay
            it (:mod:`hmrnn_lightning.engine.graphs` says what that requires: fixed batch and
            window length; other windows and evaluation run without a graph), and each
            sampling step (:meth:`step`, one graph per batch size).
    """

    def __init__(
        self,
        input_size: int,
        hidden_sizes: list[int],
        estimator: BoundaryEstimator,
        cell: str = "hm_lstm",
        layer_norm: bool = False,
        norm_placement: Literal["bottom_up_and_cell", "summed"] = "bottom_up_and_cell",
        flush_recurrent: bool = True,
        flush_gradient: bool = True,
        boundary_init: Literal["uniform", "below_only"] = "uniform",
        impl: Literal["auto", "reference", "sequence", "triton"] = "auto",
        compile: bool = False,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__(input_size, hidden_sizes)
        from hmrnn_lightning.registry import resolve

        if not isinstance(estimator, BoundaryEstimator):
            raise TypeError(f"HMStack: estimator must be a BoundaryEstimator, got {type(estimator).__name__}")
        self.cell_name = cell
        cell_class = resolve("cells", cell)
        self.estimator = estimator
        self.layer_norm = layer_norm
        options = cell_options(cell_class, cell, norm_placement=norm_placement, flush_recurrent=flush_recurrent,
                               flush_gradient=flush_gradient, boundary_init=boundary_init)
        self.cells = build_cells(cell_class, self.input_size, self.hidden_sizes, layer_norm, **options)
        if impl not in IMPLS:
            raise ValueError(f"HMStack: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.impl = impl
        if compile:
            _warn_once("HMStack: compile=True is retired and ignored (the per-step path it compiled is gone; "
                       "on a GPU impl='triton' and cuda_graph=True are the fast path)")
        self.cuda_graph = cuda_graph
        self._paths = FastPaths()  # backends, plans, captures: not state, so not in checkpoints
        # fail now, not at the first batch; a stack is built on the CPU and moved to the GPU
        # later, so the Triton path is checked as if for a GPU here, and for its device per call
        self.active_impl("cuda" if impl == "triton" else None)

    def active_impl(self, device: torch.device | str | None = None) -> str:
        """The path :meth:`forward` takes for inputs on ``device`` (default: where the parameters
        are): ``triton``, ``sequence`` or ``reference``. Checked per call, because the
        estimator (or its mode: a Bernoulli estimator thresholds in eval) can change after
        construction."""
        device = torch.device(device) if device is not None else next(self.parameters()).device
        paths = self._paths
        if self.impl == "reference":
            return "reference"
        sequence_problem = paths.sequence.why_not(self, device)
        if self.impl == "sequence":
            if sequence_problem is not None:
                raise ValueError(
                    "HMStack: impl='sequence' needs HM-LSTM cells and an estimator without trainable parameters "
                    f"({sequence_problem}: cell={self.cell_name!r}, estimator={type(self.estimator).__name__}); use impl='auto'"
                )
            return "sequence"
        fallback = "sequence" if sequence_problem is None else "reference"
        if self.impl == "triton":
            reason = paths.triton.why_not(self)
            if reason is not None:
                raise ValueError(f"HMStack: impl='triton' cannot run this stack: {reason}; use impl='auto'")
            if paths.triton.why_not(self, device) is not None:
                # a model trained with impl='triton' keeps it in its checkpoint; on a CPU (testing,
                # sampling) it runs the CPU's path rather than fail
                _warn_once(f"HMStack: impl='triton' runs on CUDA tensors (on a CPU only under TRITON_INTERPRET=1); "
                           f"on {device.type} this stack runs impl='{fallback}'")
                return fallback
            return self._unless_self_check_failed(device, fallback)
        if device.type == "cuda":
            reason = paths.triton.why_not(self, device)
            if reason is None:
                return self._unless_self_check_failed(device, fallback)
            if "Triton is not installed" in reason:
                _warn_once("HMStack: Triton is not installed, so the GPU runs the slower sequence path; "
                           "pip install 'hmrnn-lightning[gpu]'")
        return fallback

    def _unless_self_check_failed(self, device: torch.device, fallback: str) -> str:
        """``triton``, or ``fallback`` where the Triton backend failed its self-check on ``device``
        for this stack's layout (:mod:`~hmrnn_lightning.engine.self_check`)."""
        failed = self_check.failed_on(device, bool(self.layer_norm), tuple(self.hidden_sizes))
        return "triton" if failed is None else fallback

    def _fast_backend(self, x: Tensor):
        """``(backend, plan)`` for ``x``, or None for the reference loop. The Triton backend's first
        use on a device runs its self-check; if that fails, the sequence backend stands in."""
        impl = self.active_impl(x.device)
        if impl == "reference":
            return None
        plan = self._paths.plan(self.cells, self.estimator, x)
        if impl == "triton" and self._paths.triton_problem(plan, x) is not None:
            impl = "sequence" if self._paths.sequence.why_not(self) is None else "reference"
            if impl == "reference":
                return None
        return self._paths.backend(impl, self.cuda_graph), plan

    def forward(self, x: Tensor, state: State | None = None, boundaries: Tensor | None = None) -> StackOutput:
        """Run the sequence.

        Args:
            x: ``[batch, time, input_size]``.
            state: the state returned by the previous window, or None for zeros.
            boundaries: optional ``[batch, time, layers - 1]`` boundary states that replace
                the estimator's output (oracle boundaries, tests). A layer in COPY still
                carries its previous ``z``.
        """
        state = self.check_input(x, state)
        B, T, _ = x.shape
        L = self.num_layers
        if boundaries is not None and boundaries.shape != (B, T, L - 1):
            raise ValueError(f"HMStack: boundaries must have shape {(B, T, L - 1)}, got {tuple(boundaries.shape)}")
        fast = self._fast_backend(x)
        if fast is not None:
            backend, plan = fast
            return self._with_operations(state, *backend.window(plan, x, state, boundaries))
        ones = x.new_ones(B, dtype=self.state_dtype(x))
        top_z = x.new_full((B,), TOP_LAYER_Z, dtype=self.state_dtype(x))
        hidden: list[list[Tensor]] = [[] for _ in range(L)]
        zs, logits, ops_out = [], [], []
        for t in range(T):
            h_below, z_below = x[:, t], ones
            new_state: State = []
            step_z, step_logits, step_ops = [], [], []
            for l, cell in enumerate(self.cells):
                h_above = state[l + 1].h if l + 1 < L else None
                step = cell(h_below, z_below, state[l], h_above)
                if l + 1 < L:
                    z_new = boundaries[:, t, l].to(ones.dtype) if boundaries is not None else self.estimator(step.boundary_logit)
                    z = carry_boundary(step.ops.copy.squeeze(-1), state[l].z, z_new)
                    step_logits.append(step.boundary_logit)
                else:
                    z = top_z
                new_state.append(LayerState(step.h, step.c, z))
                hidden[l].append(step.h)
                step_z.append(z)
                step_ops.append(step.ops.stacked())
                h_below, z_below = step.h, z
            state = new_state
            zs.append(torch.stack(step_z, -1))
            logits.append(torch.stack(step_logits, -1) if step_logits else x.new_zeros(B, 0))
            ops_out.append(torch.stack(step_ops, 1))
        return self._pack(hidden, zs, logits, ops_out, state)

    def _step(self, x: Tensor, state: State | None) -> StackOutput:
        """The active backend's step: on the CPU's sequence backend, rows whose layer is in COPY
        are not computed at all and their boundary logits read NaN; on the GPU's Triton backend
        the window at ``T = 1``, dense, so sampling never waits on the host (captured in a CUDA
        graph with ``cuda_graph``); else :meth:`forward` on a sequence of length 1."""
        fast = self._fast_backend(x)
        if fast is None:
            return super()._step(x, state)
        backend, plan = fast
        state = self.check_input(x.unsqueeze(1), state)
        return self._with_operations(state, *backend.step(plan, x, state))

    @staticmethod
    def _with_operations(start: State, hidden, boundaries: Tensor, logits: Tensor, state: State) -> StackOutput:
        """A fast path's ``(hidden, boundaries, logits, state)`` as a :class:`StackOutput`, with
        the UPDATE / COPY / FLUSH weights derived from the boundaries and the ``start`` state."""
        from hmrnn_lightning.cells.operations import operations_from_boundaries

        first_z = torch.stack([s.z for s in start], dim=-1)
        return StackOutput(hidden, boundaries, logits, operations_from_boundaries(boundaries, first_z), state)

    @staticmethod
    def _pack(hidden, zs, logits, ops_out, state) -> StackOutput:
        return StackOutput(
            hidden=[torch.stack(h, 1) for h in hidden],
            boundaries=torch.stack(zs, 1),
            boundary_logits=torch.stack(logits, 1),
            operations=torch.stack(ops_out, 1),
            state=state,
        )

    def extra_repr(self) -> str:
        return f"cell={self.cell_name!r}, impl={self.impl!r}" + (", cuda_graph=True" if self.cuda_graph else "")
