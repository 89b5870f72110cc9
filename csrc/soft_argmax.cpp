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

// exp for float that gcc can vectorize (std::exp is an opaque call). Cephes
// expf range reduction and polynomial, about 1 ulp; NaN propagates, -inf -> 0,
// results below the smallest normal float flush to 0, above FLT_MAX give inf.
inline float fast_exp(float x) {
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

inline double fast_exp(double x) { return std::exp(x); }

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

// z = beta * h, and -inf wherever h is -inf (a masked pixel, whatever beta is). Returns max z.
template <typename T>
inline T logits(const T* h, T beta, int64_t n, T* z) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T zmax = ninf;
#pragma omp simd reduction(max : zmax)
  for (int64_t t = 0; t < n; ++t) {
    const T v = h[t] == ninf ? ninf : beta * h[t];
    z[t] = v;
    zmax = zmax > v ? zmax : v;
  }
  return zmax;
}

// Calls seg(t0, n, j0, i) for the pieces of [q0, q0 + n) that lie in one image row i, starting at column j0.
template <typename F>
inline void row_segments(int64_t q0, int64_t n, int64_t W, F&& seg) {
  int64_t t = 0;
  while (t < n) {
    const int64_t q = q0 + t, i = q / W, j0 = q - i * W;
    const int64_t len = std::min(W - j0, n - t);
    seg(t, len, j0, i);
    t += len;
  }
}

template <typename T>
void forward(const Problem<T>& P, T* kp, T* values, T* stats, int threads) {
  const int64_t HW = P.H * P.W, C = P.C;
  const T ninf = -std::numeric_limits<T>::infinity();
  parallel_for(P.B * P.K, threads, [&](int64_t row) {
    const int64_t b = row / P.K, k = row % P.K;
    const T* h = P.h.at(b, k);
    alignas(64) T z[CHUNK];
    std::vector<T> sc(C, T(0));
    T m = ninf, l = 0, sx = 0, sy = 0;
    for (int64_t q0 = 0; q0 < HW; q0 += CHUNK) {
      const int64_t n = std::min(CHUNK, HW - q0);
      const T cmax = logits(h + q0, P.beta, n, z);
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
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) z[t] = fast_exp(z[t] - mu);  // z now holds the weights e
      row_segments(q0, n, P.W, [&](int64_t t0, int64_t len, int64_t j0, int64_t i) {
        T se = 0, sex = 0;
        const T* e = z + t0;
        const T* x = P.xs.data() + j0;
#pragma omp simd reduction(+ : se, sex)
        for (int64_t t = 0; t < len; ++t) {
          se += e[t];
          sex += e[t] * x[t];
        }
        l += se;
        sx += sex;
        sy += se * P.ys[i];
      });
      for (int64_t c = 0; c < C; ++c) {
        const T* r = P.r[c].at(b, k) + q0;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t t = 0; t < n; ++t) s += z[t] * r[t];
        sc[c] += s;
      }
    }
    // A row that is masked everywhere has l = 0: 0 / 0 = NaN keypoints and values, as torch.softmax.
    kp[row * 2 + 0] = sx / l;
    kp[row * 2 + 1] = sy / l;
    for (int64_t c = 0; c < C; ++c) values[row * C + c] = sc[c] / l;
    stats[row * 2 + 0] = m;
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

template <typename T>
void backward(const Problem<T>& P, const Grads<T>& G, int threads) {
  const int64_t HW = P.H * P.W, C = P.C;
  const T ninf = -std::numeric_limits<T>::infinity();
  const bool need_h = G.gh.p != nullptr, need_r = !G.gr.empty(), need_beta = G.gbeta != nullptr;
  const bool need_delta = need_h || need_beta;
  parallel_for(P.B * P.K, threads, [&](int64_t row) {
    const int64_t b = row / P.K, k = row % P.K;
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
      logits(h + q0, beta, n, w);
#pragma omp simd
      for (int64_t t = 0; t < n; ++t) w[t] = fast_exp(w[t] - m) * inv_l;
      if (need_delta) {
        row_segments(q0, n, P.W, [&](int64_t t0, int64_t len, int64_t j0, int64_t i) {
          const T base = gy * (P.ys[i] - ky) - gx * kx;
          const T* x = P.xs.data() + j0;
          T* d = delta + t0;
#pragma omp simd
          for (int64_t t = 0; t < len; ++t) d[t] = gx * x[t] + base;
        });
      }
      for (int64_t c = 0; c < C; ++c) {
        const T g = G.gval[row * C + c], v = G.values[row * C + c];
        if (need_delta) {
          const T* r = P.r[c].at(b, k) + q0;
#pragma omp simd
          for (int64_t t = 0; t < n; ++t) delta[t] += g * (r[t] - v);
        }
        if (need_r) {
          T* gr = G.gr[c].at(b, k) + q0;
#pragma omp simd
          for (int64_t t = 0; t < n; ++t) gr[t] = g * w[t];
        }
      }
      if (need_h) {
        T* gh = G.gh.at(b, k) + q0;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) gh[t] = beta * w[t] * delta[t];
      }
      if (need_beta) {
        const T* hq = h + q0;
#pragma omp simd reduction(+ : gb)
        for (int64_t t = 0; t < n; ++t) gb += hq[t] == ninf ? T(0) : w[t] * (hq[t] - c0) * delta[t];
      }
    }
    if (need_beta) G.gbeta[row] = gb;
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

template <typename T>
void forward_typed(const py::array& heatmaps, const std::vector<py::array>& readouts, double beta, py::array& kp,
                   py::array& values, py::array& stats, int threads) {
  const Problem<T> P = problem<T>(heatmaps, readouts, beta);
  T* k = data_of<T>(kp, "keypoints", {P.B, P.K, 2});
  T* v = data_of<T>(values, "values", {P.B, P.K, P.C});
  T* s = data_of<T>(stats, "stats", {P.B, P.K, 2});
  py::gil_scoped_release nogil;
  forward(P, k, v, s, threads);
}

void forward_py(const py::array& heatmaps, const std::vector<py::array>& readouts, double beta, py::array kp,
                py::array values, py::array stats, int threads) {
  if (py::isinstance<py::array_t<double>>(heatmaps)) {
    forward_typed<double>(heatmaps, readouts, beta, kp, values, stats, threads);
  } else {
    forward_typed<float>(heatmaps, readouts, beta, kp, values, stats, threads);
  }
}

template <typename T>
void backward_typed(const py::array& grad_kp, const py::array& grad_values, const py::array& heatmaps,
                    const std::vector<py::array>& readouts, double beta, const py::array& kp,
                    const py::array& values, const py::array& stats, const py::object& grad_heatmaps,
                    const std::vector<py::array>& grad_readouts, const py::object& grad_beta, int threads) {
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
}

void backward_py(const py::array& grad_kp, const py::array& grad_values, const py::array& heatmaps,
                 const std::vector<py::array>& readouts, double beta, const py::array& kp, const py::array& values,
                 const py::array& stats, const py::object& grad_heatmaps, const std::vector<py::array>& grad_readouts,
                 const py::object& grad_beta, int threads) {
  if (py::isinstance<py::array_t<double>>(heatmaps)) {
    backward_typed<double>(grad_kp, grad_values, heatmaps, readouts, beta, kp, values, stats, grad_heatmaps,
                           grad_readouts, grad_beta, threads);
  } else {
    backward_typed<float>(grad_kp, grad_values, heatmaps, readouts, beta, kp, values, stats, grad_heatmaps,
                          grad_readouts, grad_beta, threads);
  }
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
