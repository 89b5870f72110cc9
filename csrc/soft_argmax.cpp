// C++ CPU kernels of kpfast.soft_argmax: forward (online softmax expectation of
// coordinates and readouts, one pass over each map) and backward (weights
// recomputed from the saved per-row max and normalizer). One work item per
// heatmap row (b, k); each row is processed in chunks that stay in L1, so every
// map is read from memory once per pass. Semantics:
// kpfast/reference.py::soft_argmax_reference.
//
// Maps arrive as numpy views that are contiguous within each H x W plane and
// have any (non-negative) batch and keypoint strides, so channel slices of a
// network output ([B, 3K, H, W] split into heatmaps, uncertainty and depth)
// need no copy.
//
// FP exceptions are never inspected, so this file is compiled without
// -ftrapping-math: it lets gcc turn the comparisons in fast_exp into selects and
// vectorize the loops. It changes no result (unlike -ffast-math, NaN and inf
// keep their IEEE meaning). Before every include, so that all inlined code
// shares the setting.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <algorithm>
#include <cstring>
#include <limits>

#include <pybind11/stl.h>

#include "common.h"

namespace kpfast {
namespace {

constexpr int64_t CHUNK = 1024;  // elements of one plane processed together (fits L1 with its scratch)

// Inlined into the ISA-specific clones of the row kernels below (GCC inlines a function
// without a target attribute into a clone only when told to).
#if defined(__GNUC__)
#define KPFAST_INLINE inline __attribute__((always_inline))
#else
#define KPFAST_INLINE inline
#endif

// exp for float that gcc can vectorize (std::exp is an opaque call). Cephes
// expf range reduction and polynomial, about 1 ulp; NaN propagates, -inf -> 0,
// results below the smallest normal float flush to 0, above FLT_MAX give inf.
KPFAST_INLINE float fast_exp(float x) {
  const float xc = std::min(std::max(x, -87.0f), 88.0f);
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round to nearest integer
  const float n = t - 12582912.0f;
  int32_t ti;
  std::memcpy(&ti, &t, sizeof ti);
  const int32_t ni = ti - 0x4B400000;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = (y * r) * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float out = y * scale;
  const float big = x > 88.0f ? std::numeric_limits<float>::infinity() : out;
  const float res = x < -87.0f ? 0.0f : big;
  return x != x ? x : res;
}

KPFAST_INLINE double fast_exp(double x) { return std::exp(x); }

// A stack of H x W planes indexed by (b, k): contiguous planes, any b/k strides.
template <typename T>
struct Planes {
  T* p = nullptr;
  int64_t sb = 0, sk = 0;
  T* at(int64_t b, int64_t k) const { return p + b * sb + k * sk; }
};

template <typename T>
Planes<T> planes_of(const py::array& a, const char* name, int64_t B, int64_t K, int64_t H, int64_t W) {
  if (!py::isinstance<py::array_t<T>>(a)) throw std::invalid_argument(std::string(name) + ": unexpected dtype");
  if (a.ndim() != 4 || a.shape(0) != B || a.shape(1) != K || a.shape(2) != H || a.shape(3) != W) {
    throw std::invalid_argument(std::string(name) + ": unexpected shape");
  }
  Planes<T> m;
  m.p = static_cast<T*>(const_cast<void*>(a.data()));
  if (a.size() == 0) return m;  // nothing to read (numpy reports zero strides for empty arrays)
  const auto es = static_cast<py::ssize_t>(sizeof(T));
  if ((W > 1 && a.strides(3) != es) || (H > 1 && a.strides(2) != W * es)) {
    throw std::invalid_argument(std::string(name) + ": each H x W plane must be contiguous");
  }
  if (a.strides(0) < 0 || a.strides(1) < 0 || a.strides(0) % es || a.strides(1) % es) {
    throw std::invalid_argument(std::string(name) + ": unsupported batch/keypoint strides");
  }
  m.sb = a.strides(0) / es;
  m.sk = a.strides(1) / es;
  return m;
}

template <typename T>
std::vector<Planes<T>> planes_list(const std::vector<py::array>& list, const char* name, int64_t B, int64_t K,
                                   int64_t H, int64_t W) {
  std::vector<Planes<T>> out;
  for (const auto& a : list) out.push_back(planes_of<T>(a, name, B, K, H, W));
  return out;
}

template <typename T>
struct Problem {
  int64_t B, K, H, W, C;
  T beta;
  Planes<T> h;
  std::vector<Planes<T>> r;
  std::vector<T> xs, ys;  // pixel centres

  void init_grid() {
    xs.resize(W);
    ys.resize(H);
    for (int64_t j = 0; j < W; ++j) xs[j] = j * (W > 1 ? T(2) / T(W - 1) : T(0)) - T(1);
    for (int64_t i = 0; i < H; ++i) ys[i] = i * (H > 1 ? T(2) / T(H - 1) : T(0)) - T(1);
  }
};

// The per-row kernels are compiled twice on x86-64 Linux, for x86-64-v3 (AVX2 and FMA, Haswell and
// later) and for the baseline, and the loader picks one (GCC function multi-versioning):
// the build keeps its portable flags and gets 8-wide vectors where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define KPFAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define KPFAST_CLONES
#endif

// z = beta * h, and -inf wherever h is -inf (a masked pixel, whatever beta is).
template <typename T>
KPFAST_INLINE T logit(T h, T beta) {
  return h == -std::numeric_limits<T>::infinity() ? h : beta * h;
}

// One heatmap row: sc[c] = sum_p w R_c, out = (k_x, k_y, max logit m, normalizer l); values = sc / l.
// Each chunk: (1) logits and their max, (2) weights e = exp(z - m) with the coordinate sums,
// (3) one pass per readout. Only (1) and (3) touch memory outside L1.
template <typename T>
KPFAST_CLONES void forward_row(const Problem<T>& P, int64_t b, int64_t k, T* sc, T* out) {
  const int64_t HW = P.H * P.W, C = P.C;
  const T ninf = -std::numeric_limits<T>::infinity();
  const T* h = P.h.at(b, k);
  const T beta = P.beta;
  alignas(64) T z[CHUNK];
  for (int64_t c = 0; c < C; ++c) sc[c] = T(0);
  T m = ninf, l = 0, sx = 0, sy = 0;
  for (int64_t q0 = 0; q0 < HW; q0 += CHUNK) {
    const int64_t n = std::min(CHUNK, HW - q0);
    const T* hq = h + q0;
    T cmax = ninf;
#pragma omp simd reduction(max : cmax)
    for (int64_t t = 0; t < n; ++t) {
      const T v = logit(hq[t], beta);
      z[t] = v;
      cmax = cmax > v ? cmax : v;
    }
    const T mnew = std::max(m, cmax);
    const T mu = mnew == ninf ? T(0) : mnew;  // a chunk of masked pixels only adds exp(-inf) = 0
    const T alpha = fast_exp(m - mu);          // 0 while nothing was seen (m = -inf)
    if (alpha != T(1)) {
      l *= alpha;
      sx *= alpha;
      sy *= alpha;
      for (int64_t c = 0; c < C; ++c) sc[c] *= alpha;
    }
    m = mnew;
    for (int64_t t0 = 0, len; t0 < n; t0 += len) {  // one image row at a time: y is constant
      const int64_t q = q0 + t0, i = q / P.W, j0 = q - i * P.W;
      len = std::min(P.W - j0, n - t0);
      T se = 0, sex = 0;
      T* e = z + t0;
      const T* x = P.xs.data() + j0;
#pragma omp simd reduction(+ : se, sex)
      for (int64_t t = 0; t < len; ++t) {
        const T w = fast_exp(e[t] - mu);
        e[t] = w;
        se += w;
        sex += w * x[t];
      }
      l += se;
      sx += sex;
      sy += se * P.ys[i];
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* r = P.r[c].at(b, k) + q0;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t t = 0; t < n; ++t) s += z[t] * r[t];
      sc[c] += s;
    }
  }
  out[0] = sx;
  out[1] = sy;
  out[2] = m;
  out[3] = l;
}

template <typename T>
void forward(const Problem<T>& P, T* kp, T* values, T* stats, int threads) {
  const int64_t C = P.C;
  parallel_for(P.B * P.K, threads, [&](int64_t row) {
    T out[4];
    T* sc = values + row * C;
    forward_row(P, row / P.K, row % P.K, sc, out);
    const T l = out[3];
    // A row that is masked everywhere has l = 0: 0 / 0 = NaN keypoints and values, as torch.softmax.
    kp[row * 2 + 0] = out[0] / l;
    kp[row * 2 + 1] = out[1] / l;
    for (int64_t c = 0; c < C; ++c) sc[c] /= l;
    stats[row * 2 + 0] = out[2];
    stats[row * 2 + 1] = l;
  });
}

template <typename T>
struct Grads {
  const T* gkp;         // [B, K, 2]
  const T* gval;        // [B, K, C]
  const T* kp;          // [B, K, 2]
  const T* values;      // [B, K, C]
  const T* stats;       // [B, K, 2]: max logit m and normalizer l
  Planes<T> gh;         // p == nullptr: not needed
  std::vector<Planes<T>> gr;  // empty: not needed
  T* gbeta;             // [B, K] or nullptr
};

// One heatmap row of the backward; returns its share of d/dbeta. With w = exp(z - m) / l and
// delta = g_x (x - k_x) + g_y (y - k_y) + sum_c g_c (R_c - r_c):
//   dL/dh = beta w delta (0 at a masked pixel),  dL/dR_c = g_c w,  dL/dbeta = sum_p w h delta.
// Each chunk: (1) w and the coordinate part of delta, (2) one pass per readout, (3) dL/dh and
// dL/dbeta; every map is read or written once.
template <typename T>
KPFAST_CLONES T backward_row(const Problem<T>& P, const Grads<T>& G, int64_t row) {
  const int64_t HW = P.H * P.W, C = P.C;
  const int64_t b = row / P.K, k = row % P.K;
  const T ninf = -std::numeric_limits<T>::infinity();
  const bool need_h = G.gh.p != nullptr, need_r = !G.gr.empty(), need_beta = G.gbeta != nullptr;
  const bool need_delta = need_h || need_beta;
  const T* h = P.h.at(b, k);
  const T m = G.stats[row * 2], inv_l = T(1) / G.stats[row * 2 + 1];
  const T gx = G.gkp[row * 2], gy = G.gkp[row * 2 + 1];
  const T kx = G.kp[row * 2], ky = G.kp[row * 2 + 1];
  const T beta = P.beta;
  // sum_p w (h - c0) delta = sum_p w h delta (sum_p w delta = 0); c0 ~ max h keeps the terms small.
  const T c0 = (beta != T(0) && std::isfinite(m)) ? m / beta : T(0);
  alignas(64) T w[CHUNK];
  alignas(64) T delta[CHUNK];
  T gb = 0;
  for (int64_t q0 = 0; q0 < HW; q0 += CHUNK) {
    const int64_t n = std::min(CHUNK, HW - q0);
    const T* hq = h + q0;
    for (int64_t t0 = 0, len; t0 < n; t0 += len) {  // one image row at a time: y is constant
      const int64_t q = q0 + t0, i = q / P.W, j0 = q - i * P.W;
      len = std::min(P.W - j0, n - t0);
      // gx (x - kx), not gx x - gx kx: where the weight is concentrated x is close to kx, and
      // the difference of the products would leave an error of ~eps |gx| that beta multiplies.
      const T dy = gy * (P.ys[i] - ky);
      const T* x = P.xs.data() + j0;
      const T* hs = hq + t0;
      T* ws = w + t0;
      T* d = delta + t0;
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        ws[t] = fast_exp(logit(hs[t], beta) - m) * inv_l;
        d[t] = gx * (x[t] - kx) + dy;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const T g = G.gval[row * C + c], v = G.values[row * C + c];
      const T* r = P.r[c].at(b, k) + q0;
      if (need_delta && need_r) {
        T* gr = G.gr[c].at(b, k) + q0;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) {
          delta[t] += g * (r[t] - v);
          gr[t] = g * w[t];
        }
      } else if (need_delta) {
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) delta[t] += g * (r[t] - v);
      } else if (need_r) {
        T* gr = G.gr[c].at(b, k) + q0;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) gr[t] = g * w[t];
      }
    }
    if (need_h) {
      T* gh = G.gh.at(b, k) + q0;
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) gh[t] = hq[t] == ninf ? T(0) : beta * w[t] * delta[t];  // masked: none
    }
    if (need_beta) {
#pragma omp simd reduction(+ : gb)
      for (int64_t t = 0; t < n; ++t) gb += hq[t] == ninf ? T(0) : w[t] * (hq[t] - c0) * delta[t];
    }
  }
  return gb;
}

template <typename T>
void backward(const Problem<T>& P, const Grads<T>& G, int threads) {
  parallel_for(P.B * P.K, threads, [&](int64_t row) {
    const T gb = backward_row(P, G, row);
    if (G.gbeta) G.gbeta[row] = gb;
  });
}

template <typename T>
Problem<T> problem(const py::array& heatmaps, const std::vector<py::array>& readouts, double beta) {
  Problem<T> P;
  if (heatmaps.ndim() != 4) throw std::invalid_argument("heatmaps: must be [B, K, H, W]");
  P.B = heatmaps.shape(0);
  P.K = heatmaps.shape(1);
  P.H = heatmaps.shape(2);
  P.W = heatmaps.shape(3);
  P.C = static_cast<int64_t>(readouts.size());
  P.beta = static_cast<T>(beta);
  P.h = planes_of<T>(heatmaps, "heatmaps", P.B, P.K, P.H, P.W);
  P.r = planes_list<T>(readouts, "readouts", P.B, P.K, P.H, P.W);
  P.init_grid();
  return P;
}

void forward_py(const py::array& heatmaps, const std::vector<py::array>& readouts, double beta, py::array kp,
                py::array values, py::array stats, int threads) {
  with_float_type(heatmaps, [&](auto zero) {
    using T = decltype(zero);
    const Problem<T> P = problem<T>(heatmaps, readouts, beta);
    T* k = data_of<T>(kp, "keypoints", {P.B, P.K, 2});
    T* v = data_of<T>(values, "values", {P.B, P.K, P.C});
    T* s = data_of<T>(stats, "stats", {P.B, P.K, 2});
    py::gil_scoped_release nogil;
    forward(P, k, v, s, threads);
  });
}

void backward_py(const py::array& grad_kp, const py::array& grad_values, const py::array& heatmaps,
                 const std::vector<py::array>& readouts, double beta, const py::array& kp, const py::array& values,
                 const py::array& stats, const py::object& grad_heatmaps, const std::vector<py::array>& grad_readouts,
                 const py::object& grad_beta, int threads) {
  with_float_type(heatmaps, [&](auto zero) {
    using T = decltype(zero);
    const Problem<T> P = problem<T>(heatmaps, readouts, beta);
    Grads<T> G;
    G.gkp = data_of<T>(grad_kp, "grad_keypoints", {P.B, P.K, 2});
    G.gval = data_of<T>(grad_values, "grad_values", {P.B, P.K, P.C});
    G.kp = data_of<T>(kp, "keypoints", {P.B, P.K, 2});
    G.values = data_of<T>(values, "values", {P.B, P.K, P.C});
    G.stats = data_of<T>(stats, "stats", {P.B, P.K, 2});
    if (!grad_heatmaps.is_none()) {
      G.gh = planes_of<T>(grad_heatmaps.cast<py::array>(), "grad_heatmaps", P.B, P.K, P.H, P.W);
    }
    if (!grad_readouts.empty()) {
      if (static_cast<int64_t>(grad_readouts.size()) != P.C) throw std::invalid_argument("grad_readouts: one map per readout");
      G.gr = planes_list<T>(grad_readouts, "grad_readouts", P.B, P.K, P.H, P.W);
    }
    G.gbeta = optional_data_of<T>(grad_beta, "grad_beta", {P.B, P.K});
    py::gil_scoped_release nogil;
    backward(P, G, threads);
  });
}

}  // namespace

void register_soft_argmax(py::module_& m) {
  m.def("soft_argmax_forward", &forward_py,
        "soft_argmax forward: writes keypoints [B,K,2], values [B,K,C] and per-row (max, normalizer) [B,K,2]");
  m.def("soft_argmax_backward", &backward_py,
        "soft_argmax backward: writes grad_heatmaps, grad_readouts (one plane stack per readout) and "
        "per-row grad_beta [B,K], each optional");
}

}  // namespace kpfast
