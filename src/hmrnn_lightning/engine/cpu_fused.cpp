// One HM-LSTM layer and step, forward and backward, on a CPU: the pointwise work of
// engine/kernels.py's step_forward / step_backward (the Triton kernels) as plain loops, one call
// per layer and step, with the same arguments (cpu_fused.py maps the keyword launch onto them:
// pre-activation rows ROW apart, the bias at base_stride, each norm's own eps, top_z).
// Built by cpu_fused.py with the system C++ compiler; C linkage, so it is
// called through ctypes and needs no PyTorch headers (those would cost about a minute to compile).
// Each function comes for float and for double; rows are independent, the loops over a row's
// H columns are written for the compiler to vectorise (`omp simd`, with vector exp from libmvec).
// The arguments are __restrict__ (no two that are read or written overlap), so that the compiler
// vectorises without run-time overlap checks, whose scalar fallback would round exp differently.
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// The switches of the Triton kernels' constexpr arguments, as bits of one `flags` argument.
enum : int64_t {
  HAS_BASE = 1, HAS_BELOW = 4, BELOW_GATED = 8, NORM_BELOW = 16, NORM_CELL = 32, TOP = 64,
  WRITE_OWN = 128, WRITE_UP = 256, WRITE_DOWN = 512, HAS_GH = 1024, HAS_GZ = 2048, HAS_GLOGIT = 4096,
  HAS_DREC = 8192, HAS_DXA = 16384, HAS_DXB = 32768, FLUSH_GRAD = 65536,
};
enum : int64_t { GIVEN = 0, STEP = 1, BERNOULLI = 2, SOFT = 3 };  // engine/plan.py's modes

// The exponent is clamped to [-80, 80] so that exp never overflows: the library is built with
// fast-math's finite-math assumption, which glibc needs to declare its vector exp (libmvec; without
// it every exp was a scalar call, 2-3x the kernels' time), and under which exp's inf would become
// NaN. At |x| = 80 both are saturated in float and double (1 - sigm(80) = 1.8e-35).
#pragma omp declare simd
template <typename T> inline T sigm(T x) { return T(1) / (T(1) + std::exp(std::fmin(std::fmax(-x, T(-80)), T(80)))); }
#pragma omp declare simd
template <typename T> inline T tanh_exp(T x) { return T(2) / (T(1) + std::exp(std::fmin(std::fmax(T(-2) * x, T(-80)), T(80)))) - T(1); }

// Layer-norm statistics of x[0:n]: (mean, 1/std) with the biased variance, as nn.LayerNorm.
// A term of the layer above or below read h_t gated by a boundary: dh += gate * d, and the
// gate's own gradient is h_t . d (returned).
template <typename T> inline T add_gated_read(T* dh, const T* h_t, const T* d, T gate, int64_t H) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < H; ++j) {
    dh[j] += gate * d[j];
    acc += h_t[j] * d[j];
  }
  return acc;
}

template <typename T> inline void norm_stats(const T* x, int64_t n, T eps, T& mean, T& rstd) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  mean = sum / T(n);
  T var = 0;
#pragma omp simd reduction(+ : var)
  for (int64_t j = 0; j < n; ++j) var += (x[j] - mean) * (x[j] - mean);
  rstd = T(1) / std::sqrt(var / T(n) + eps);
}

template <typename T>
void step_forward(int64_t rows, int64_t H, int64_t ROW, int64_t flags, int64_t mode, T* __restrict__ s_, const T* __restrict__ base_, int64_t base_stride, const T* __restrict__ below_,
                  const T* __restrict__ gb, const T* __restrict__ bb, const T* __restrict__ c_prev_, const T* __restrict__ h_prev_, const T* __restrict__ zp_, const T* __restrict__ zb_,
                  const T* __restrict__ gc, const T* __restrict__ bc, const T* __restrict__ given, const T* __restrict__ slope_, T* __restrict__ c_, T* __restrict__ h_, T* __restrict__ z_, T* __restrict__ e_, T* __restrict__ logit_,
                  T* __restrict__ own_, int64_t own_stride, T* __restrict__ up_, int64_t up_stride, T* __restrict__ down_, int64_t down_stride, double below_eps_, double cell_eps_, double top_z) {
  const int64_t W = 4 * H + 1;  // the data of a row; ROW >= W apart (the pad is never read)
  const T below_eps = T(below_eps_), cell_eps = T(cell_eps_);
  std::vector<T> n_buf(W);
  T* n = n_buf.data();
  for (int64_t row = 0; row < rows; ++row) {
    T* s = s_ + row * ROW;
    if (flags & HAS_BASE) {
      const T* q = base_ + row * base_stride;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) s[j] += q[j];
    }
    const T zp = zp_[row];
    const T zb = (flags & BELOW_GATED) ? zb_[row] : T(1);
    if (flags & HAS_BELOW) {
      const T* r = below_ + row * ROW;
      if (flags & NORM_BELOW) {
        T mean, rstd;
        norm_stats(r, W, below_eps, mean, rstd);
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) s[j] += zb * ((r[j] - mean) * rstd * gb[j] + bb[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) s[j] += zb * r[j];
      }
    }
    const T u = (T(1) - zp) * zb, k = (T(1) - zp) * (T(1) - zb);
    const T* c_prev = c_prev_ + row * H;
    const T* h_prev = h_prev_ + row * H;
    T* c = c_ + row * H;
    T* h = h_ + row * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T f = sigm(s[j]), i = sigm(s[H + j]), g = tanh_exp(s[3 * H + j]);
      c[j] = (k + u * f) * c_prev[j] + (u + zp) * (i * g);
    }
    const T* normed = c;
    if (flags & NORM_CELL) {
      T mean, rstd;
      norm_stats(c, H, cell_eps, mean, rstd);
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) n[j] = (c[j] - mean) * rstd * gc[j] + bc[j];
      normed = n;
    }
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) h[j] = k * h_prev[j] + (T(1) - k) * (sigm(s[2 * H + j]) * tanh_exp(normed[j]));
    if (flags & WRITE_OWN) {
      T* own = own_ + row * own_stride;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) own[j] = h[j];
    }
    if (flags & WRITE_UP) {
      T* up = up_ + row * up_stride;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) up[j] = zb * h[j];
    }
    if (flags & TOP) {
      z_[row] = T(top_z);  // operations.TOP_LAYER_Z, as given
      continue;
    }
    const T logit = s[4 * H];
    T e;
    if (mode == GIVEN) {
      e = given[row];
    } else {
      const T slope = slope_[0];
      const T p = std::fmin(std::fmax((slope * logit + T(1)) * T(0.5), T(0)), T(1));
      if (mode == STEP) e = p > T(0.5) ? T(1) : T(0);
      else if (mode == BERNOULLI) e = given[row] < p ? T(1) : T(0);
      else e = p;
    }
    e_[row] = e;
    logit_[row] = logit;
    const T z = k * zp + (T(1) - k) * e;
    z_[row] = z;
    if (flags & WRITE_DOWN) {
      T* down = down_ + row * down_stride;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) down[j] = z * h[j];
    }
  }
}

template <typename T>
void step_backward(int64_t rows, int64_t H, int64_t ROW, int64_t flags, int64_t mode, T* __restrict__ s_, T* __restrict__ below_, const T* __restrict__ gb, const T* __restrict__ bb,
                   T* __restrict__ dgb_, T* __restrict__ dbb_, const T* __restrict__ c_t_, const T* __restrict__ c_prev_, const T* __restrict__ h_prev_, const T* __restrict__ h_t_, const T* __restrict__ zp_,
                   const T* __restrict__ zb_, const T* __restrict__ e_, const T* __restrict__ slope_, const T* __restrict__ gc, const T* __restrict__ bc, T* __restrict__ dgc_, T* __restrict__ dbc_,
                   const T* __restrict__ gh_, T* __restrict__ dh_, T* __restrict__ dc_, T* __restrict__ dz_, const T* __restrict__ gz_, const T* __restrict__ glogit_, const T* __restrict__ drec_,
                   int64_t drec_stride, const T* __restrict__ dxa_, int64_t dxa_stride, const T* __restrict__ dxb_, int64_t dxb_stride, T* __restrict__ dzb_,
                   const T* __restrict__ z_, double below_eps_, double cell_eps_) {
  const int64_t W = 4 * H + 1;
  const T below_eps = T(below_eps_), cell_eps = T(cell_eps_);
  std::vector<T> buf(4 * H);
  T* dh = buf.data();      // d h_t, gathered
  T* tc = dh + H;          // tanh(N(c_t))
  T* chat = tc + H;        // the cell norm's x^
  T* d_n = chat + H;       // d N(c_t)
  for (int64_t row = 0; row < rows; ++row) {
    T* s = s_ + row * ROW;
    const T zp = zp_[row];
    const T zb = (flags & BELOW_GATED) ? zb_[row] : T(1);
    const T u = (T(1) - zp) * zb, k = (T(1) - zp) * (T(1) - zb);
    const T* h_t = h_t_ + row * H;
    const T* c_t = c_t_ + row * H;
    const T* c_prev = c_prev_ + row * H;
    const T* h_prev = h_prev_ + row * H;
    T* dh_acc = dh_ + row * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dh[j] = dh_acc[j];
    if (flags & HAS_GH) {
      const T* gh = gh_ + row * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) dh[j] += gh[j];
    }
    if (flags & HAS_DREC) {
      const T* drec = drec_ + row * drec_stride;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) dh[j] += drec[j];
    }
    T dzb = 0;
    if (flags & HAS_DXA)  // the layer below's top-down term read h_t, gated by z_below
      dzb += add_gated_read(dh, h_t, dxa_ + row * dxa_stride, zb, H);
    T dz = 0;
    if (!(flags & TOP)) {
      dz = dz_[row];
      if (flags & HAS_GZ) dz += gz_[row];
      if (flags & HAS_DXB)  // the layer above's bottom-up term read h_t, gated by this layer's z
        dz += add_gated_read(dh, h_t, dxb_ + row * dxb_stride, z_[row], H);
    }
    T c_rstd = 0;
    if (flags & NORM_CELL) {
      T mean;
      norm_stats(c_t, H, cell_eps, mean, c_rstd);
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        chat[j] = (c_t[j] - mean) * c_rstd;
        tc[j] = tanh_exp(chat[j] * gc[j] + bc[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) tc[j] = tanh_exp(c_t[j]);
    }
    T dk = 0;
    T* s_o = s + 2 * H;  // read as o, written as its gradient: nothing reads o after this loop
#pragma omp simd reduction(+ : dk)
    for (int64_t j = 0; j < H; ++j) {
      const T o = sigm(s_o[j]);
      const T dh_new = (T(1) - k) * dh[j];
      dk += (h_prev[j] - o * tc[j]) * dh[j];
      d_n[j] = o * dh_new * (T(1) - tc[j] * tc[j]);
      s_o[j] = tc[j] * dh_new * o * (T(1) - o);
    }
    T* dc = dc_ + row * H;
    if (flags & NORM_CELL) {
      T* dgc = dgc_ + row * H;
      T* dbc = dbc_ + row * H;
      T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
      for (int64_t j = 0; j < H; ++j) {
        dgc[j] += d_n[j] * chat[j];
        dbc[j] += d_n[j];
        const T dxh = d_n[j] * gc[j];
        m1 += dxh;
        m2 += dxh * chat[j];
      }
      m1 /= T(H);
      m2 /= T(H);
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) d_n[j] = c_rstd * (d_n[j] * gc[j] - m1 - chat[j] * m2);
    }
    T du = 0, dzp = 0, dk2 = 0;
#pragma omp simd reduction(+ : du, dzp, dk2)
    for (int64_t j = 0; j < H; ++j) {
      const T f = sigm(s[j]), i = sigm(s[H + j]), g = tanh_exp(s[3 * H + j]);
      const T dct = dc[j] + d_n[j];
      const T uz_dct = (u + zp) * dct;
      const T ig = i * g;
      du += (ig + f * c_prev[j]) * dct;
      dzp += ig * dct;  // FLUSH's weight is z_prev itself
      dk2 += c_prev[j] * dct;
      s[j] = u * c_prev[j] * dct * f * (T(1) - f);
      s[H + j] = uz_dct * g * i * (T(1) - i);
      s[3 * H + j] = uz_dct * i * (T(1) - g * g);
      dc[j] = (k + u * f) * dct;
      dh_acc[j] = k * dh[j];
    }
    dk += dk2;
    T d_logit = 0;
    T carry = 0;  // z_prev's gradient through COPY's carry alone
    if (!(flags & TOP)) {
      const T e = e_[row];
      carry = k * dz;
      dzp += carry;
      dk += (zp - e) * dz;
      if (mode != GIVEN) {  // straight through the hard sigmoid: a / 2 where it is not clipped
        const T slope = slope_[0];
        const T q = (slope * s[4 * H] + T(1)) * T(0.5);
        d_logit = (q >= T(0) && q <= T(1)) ? (T(1) - k) * dz * slope * T(0.5) : T(0);
      }
      if (flags & HAS_GLOGIT) d_logit += glogit_[row];
    }
    if (flags & BELOW_GATED) {
      dzp += -zb * du - (T(1) - zb) * dk;
      dzb += (T(1) - zp) * (du - dk);
    } else {
      dzp += -du;
    }
    dz_[row] = (flags & FLUSH_GRAD) ? dzp : carry;  // without it z_prev is a constant in the operations' weights
    s[4 * H] = d_logit;  // s now holds ds
    if (flags & HAS_BELOW) {  // the backward kernel's bottom-up term is always normalised
      // d LN(raw) = z_below ds; the gate's gradient is <LN(raw), ds>; raw is overwritten by d raw
      T* r = below_ + row * ROW;
      T* dgb = dgb_ + row * ROW;
      T* dbb = dbb_ + row * ROW;
      T mean, rstd;
      norm_stats(r, W, below_eps, mean, rstd);
      T gate = 0, m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : gate, m1, m2)
      for (int64_t j = 0; j < W; ++j) {
        const T nj = (r[j] - mean) * rstd;
        gate += (nj * gb[j] + bb[j]) * s[j];
        const T y = zb * s[j];
        dgb[j] += y * nj;
        dbb[j] += y;
        const T x = y * gb[j];
        m1 += x;
        m2 += x * nj;
      }
      if (flags & BELOW_GATED) dzb += gate;
      m1 /= T(W);
      m2 /= T(W);
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) {
        const T nj = (r[j] - mean) * rstd;
        r[j] = rstd * (zb * s[j] * gb[j] - m1 - nj * m2);
      }
    }
    if (flags & BELOW_GATED) dzb_[row] += dzb;
  }
}

}  // namespace

// The entry points ctypes calls: <name>_f32 and <name>_f64, arguments as in the templates.
#define HMRNN_EXPORT(T, SUFFIX)                                                                                     \
  extern "C" void step_forward_##SUFFIX(                                                                            \
      int64_t rows, int64_t H, int64_t ROW, int64_t flags, int64_t mode, T* s, const T* base, int64_t base_stride,  \
      const T* below, const T* gb, const T* bb, const T* c_prev, const T* h_prev, const T* zp, const T* zb,         \
      const T* gc, const T* bc, const T* given, const T* slope, T* c, T* h, T* z, T* e, T* logit, T* own,           \
      int64_t own_stride, T* up, int64_t up_stride, T* down, int64_t down_stride, double below_eps,                 \
      double cell_eps, double top_z) {                                                                              \
    step_forward<T>(rows, H, ROW, flags, mode, s, base, base_stride, below, gb, bb, c_prev, h_prev, zp, zb, gc, bc, \
                    given, slope, c, h, z, e, logit, own, own_stride, up, up_stride, down, down_stride, below_eps, \
                    cell_eps, top_z);                                                                               \
  }                                                                                                                 \
  extern "C" void step_backward_##SUFFIX(                                                                           \
      int64_t rows, int64_t H, int64_t ROW, int64_t flags, int64_t mode, T* s, T* below, const T* gb, const T* bb,  \
      T* dgb, T* dbb, const T* c_t, const T* c_prev, const T* h_prev, const T* h_t, const T* zp, const T* zb,       \
      const T* e, const T* slope, const T* gc, const T* bc, T* dgc, T* dbc, const T* gh, T* dh, T* dc, T* dz,       \
      const T* gz, const T* glogit, const T* drec, int64_t drec_stride, const T* dxa, int64_t dxa_stride,          \
      const T* dxb, int64_t dxb_stride, T* dzb, const T* z, double below_eps, double cell_eps) {                    \
    step_backward<T>(rows, H, ROW, flags, mode, s, below, gb, bb, dgb, dbb, c_t, c_prev, h_prev, h_t, zp, zb, e,   \
                     slope, gc, bc, dgc, dbc, gh, dh, dc, dz, gz, glogit, drec, drec_stride, dxa, dxa_stride, dxb, \
                     dxb_stride, dzb, z, below_eps, cell_eps);                                                      \
  }
HMRNN_EXPORT(float, f32)
HMRNN_EXPORT(double, f64)
