// C++ CPU kernels of kpfast.edge_map: forward (max over edges with exact tile
// culling) and backward (gradient of the winning edge per pixel, reduced per
// edge). Semantics: kpfast/reference.py::edge_map_reference.
#include <algorithm>
#include <limits>
#include <memory>

#include "common.h"

namespace kpfast {
namespace {

constexpr int TILE_H = 8;
constexpr int TILE_W = 16;
constexpr int BAND_H = 16;  // rows per backward work item
constexpr int NGRAD = 8;    // d/d(ax, ay, bx, by, v_i, v_j, w, sigma2) per edge

template <typename T>
struct Edge {
  T ax, ay, bx, by, abx, aby, len2;
  bool point;
  bool finite;  // no NaN or inf among its inputs: only such an edge may be culled
  T vi, vj, umin, umax, w;
  T tol;  // bound on the rounding error of a squared distance for this edge
};

template <typename T>
struct Sample {
  T apx, apy, t_raw, t, qx, qy, d2, u, ex, s;
};

template <typename T>
struct Problem {
  const T* kp;
  const int32_t* edges;
  const T* unc;  // nullptr: no uncertainty
  const T* w;    // nullptr: unit weights
  int64_t w_bstride;
  T s2, eps;
  int64_t B, K, E, H, W;
  bool precision;

  T x(int64_t j) const { return j * (W > 1 ? T(2) / T(W - 1) : T(0)) - T(1); }
  T y(int64_t i) const { return i * (H > 1 ? T(2) / T(H - 1) : T(0)) - T(1); }

  Edge<T> edge(int64_t b, int64_t e) const {
    Edge<T> g;
    const int32_t i = edges[2 * e], j = edges[2 * e + 1];
    const T* k = kp + b * K * 2;
    g.ax = k[2 * i];
    g.ay = k[2 * i + 1];
    g.bx = k[2 * j];
    g.by = k[2 * j + 1];
    g.abx = g.bx - g.ax;
    g.aby = g.by - g.ay;
    g.len2 = g.abx * g.abx + g.aby * g.aby;
    g.point = g.len2 < eps;
    if (unc) {
      g.vi = unc[b * K + i];
      g.vj = unc[b * K + j];
      const T si = sigmoid(g.vi), sj = sigmoid(g.vj);
      g.umin = std::min(si, sj);
      g.umax = std::max(si, sj);
    } else {
      g.vi = g.vj = T(0);
      g.umin = g.umax = T(1);
    }
    g.w = w ? w[b * w_bstride + e] : T(1);
    g.finite = std::isfinite(g.ax) && std::isfinite(g.ay) && std::isfinite(g.bx) && std::isfinite(g.by) &&
               std::isfinite(g.vi) && std::isfinite(g.vj) && std::isfinite(g.w);
    const T r2 = T(2) + g.ax * g.ax + g.ay * g.ay + g.bx * g.bx + g.by * g.by;
    g.tol = (sizeof(T) == 4 ? T(1e-5) : T(1e-12)) * r2;
    return g;
  }

  Sample<T> eval(const Edge<T>& g, T px, T py) const {
    Sample<T> r;
    r.apx = px - g.ax;
    r.apy = py - g.ay;
    r.t_raw = g.point ? T(0) : (r.apx * g.abx + r.apy * g.aby) / g.len2;
    if (r.t_raw <= 0) {
      r.t = 0;
      r.qx = r.apx;
      r.qy = r.apy;
    } else if (r.t_raw >= 1) {
      r.t = 1;
      r.qx = px - g.bx;
      r.qy = py - g.by;
    } else {  // also NaN, which then propagates
      r.t = r.t_raw;
      r.qx = r.apx - r.t * g.abx;
      r.qy = r.apy - r.t * g.aby;
    }
    r.d2 = r.qx * r.qx + r.qy * r.qy;
    r.u = unc ? sigmoid((1 - r.t) * g.vi + r.t * g.vj) : T(1);
    if (precision) {
      r.ex = std::exp(-(r.u * r.d2) / s2);
      r.s = r.ex * g.w;
    } else {
      r.ex = std::exp(-r.d2 / s2);
      r.s = (r.u * r.ex) * g.w;
    }
    return r;
  }
};

template <typename T>
T point_segment_dist2(T px, T py, const Edge<T>& g) {
  T t = g.point ? T(0) : ((px - g.ax) * g.abx + (py - g.ay) * g.aby) / g.len2;
  t = std::min(std::max(t, T(0)), T(1));
  const T dx = px - g.ax - t * g.abx, dy = py - g.ay - t * g.aby;
  return dx * dx + dy * dy;
}

template <typename T>
T point_box_dist2(T px, T py, T x0, T y0, T x1, T y1) {
  const T dx = std::max(std::max(x0 - px, px - x1), T(0));
  const T dy = std::max(std::max(y0 - py, py - y1), T(0));
  return dx * dx + dy * dy;
}

// Squared distance between the segment and the box [x0, x1] x [y0, y1].
template <typename T>
T segment_box_dist2(const Edge<T>& g, T x0, T y0, T x1, T y1) {
  const T da = point_box_dist2(g.ax, g.ay, x0, y0, x1, y1);
  const T db = point_box_dist2(g.bx, g.by, x0, y0, x1, y1);
  const T cx[4] = {x0, x1, x0, x1}, cy[4] = {y0, y0, y1, y1};
  T cmin = 0, cmax = 0, best = std::min(da, db);
  for (int c = 0; c < 4; ++c) {
    const T cr = g.abx * (cy[c] - g.ay) - g.aby * (cx[c] - g.ax);
    cmin = c ? std::min(cmin, cr) : cr;
    cmax = c ? std::max(cmax, cr) : cr;
    best = std::min(best, point_segment_dist2(cx[c], cy[c], g));
  }
  const bool overlap = std::max(g.ax, g.bx) >= x0 && std::min(g.ax, g.bx) <= x1 &&
                       std::max(g.ay, g.by) >= y0 && std::min(g.ay, g.by) <= y1;
  if (overlap && cmin <= 0 && cmax >= 0) return T(0);
  return best;
}

// An upper bound of S_e over the box, loose enough to cover rounding.
template <typename T>
T upper_bound(const Problem<T>& P, const Edge<T>& g, T x0, T y0, T x1, T y1) {
  const T d2 = std::max(segment_box_dist2(g, x0, y0, x1, y1) - g.tol, T(0));
  const T ex = P.precision ? std::exp(-(g.umin * d2) / P.s2) : g.umax * std::exp(-d2 / P.s2);
  return ex * g.w * T(1.0001);
}

template <typename T>
std::vector<Edge<T>> all_edges(const Problem<T>& P, int threads) {
  std::vector<Edge<T>> geom(P.B * P.E);
  parallel_for(P.B, threads, [&](int64_t b) {
    for (int64_t e = 0; e < P.E; ++e) geom[b * P.E + e] = P.edge(b, e);
  });
  return geom;
}

template <typename T>
void forward(const Problem<T>& P, T* out, int32_t* winner, int threads) {
  const int64_t th = (P.H + TILE_H - 1) / TILE_H, tw = (P.W + TILE_W - 1) / TILE_W;
  const std::vector<Edge<T>> geom = all_edges(P, threads);
  parallel_for(P.B * th * tw, threads, [&](int64_t item) {
    const int64_t b = item / (th * tw), ti = (item / tw) % th, tj = item % tw;
    const int64_t i0 = ti * TILE_H, j0 = tj * TILE_W;
    const int64_t i1 = std::min(i0 + TILE_H, P.H), j1 = std::min(j0 + TILE_W, P.W);
    const T x0 = P.x(j0), x1 = P.x(j1 - 1), y0 = P.y(i0), y1 = P.y(i1 - 1);
    T best[TILE_H * TILE_W];
    int32_t arg[TILE_H * TILE_W];
    std::fill(best, best + TILE_H * TILE_W, -std::numeric_limits<T>::infinity());
    std::fill(arg, arg + TILE_H * TILE_W, -1);
    T tile_min = -std::numeric_limits<T>::infinity();
    for (int64_t e = 0; e < P.E; ++e) {
      const Edge<T>& g = geom[b * P.E + e];
      // Exact culling: S_e <= bound <= best(p) everywhere in the tile, so e wins nowhere. The bound's
      // std::min/std::max may drop a NaN, so an edge with a non-finite input is always evaluated.
      if (g.finite && g.w >= 0 && upper_bound(P, g, x0, y0, x1, y1) <= tile_min) continue;
      T new_min = std::numeric_limits<T>::infinity();
      for (int64_t i = i0; i < i1; ++i) {
        const T py = P.y(i);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t l = (i - i0) * TILE_W + (j - j0);
          const T s = P.eval(g, P.x(j), py).s;
          if (s > best[l] || arg[l] < 0 || (s != s && best[l] == best[l])) {  // as torch.max: edge 0 first, NaN sticks
            best[l] = s;
            arg[l] = static_cast<int32_t>(e);
          }
          new_min = std::min(new_min, best[l]);
        }
      }
      tile_min = new_min;
    }
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t l = (i - i0) * TILE_W + (j - j0);
        const int64_t o = (b * P.H + i) * P.W + j;
        out[o] = P.E ? best[l] : T(0);
        winner[o] = arg[l];
      }
    }
  });
}

// Adds go * d S_e(p) / d(ax, ay, bx, by, v_i, v_j, w, sigma2) to acc[0..8).
template <typename T>
void accumulate(const Problem<T>& P, const Edge<T>& g, T px, T py, T go, double* acc) {
  const Sample<T> r = P.eval(g, px, py);
  T dw, dd2, du, ds2;
  if (P.precision) {  // S = w exp(-u d2 / s2)
    dw = r.ex;
    const T s = r.ex * g.w;
    dd2 = -s * r.u / P.s2;
    du = -s * r.d2 / P.s2;
    ds2 = s * r.u * r.d2 / (P.s2 * P.s2);
  } else {  // S = w u exp(-d2 / s2)
    dw = r.u * r.ex;
    const T s = dw * g.w;
    dd2 = -s / P.s2;
    du = r.ex * g.w;
    ds2 = s * r.d2 / (P.s2 * P.s2);
  }
  // d2 is minimal in t, so its gradient ignores t: dd2/da = -2 q (1 - t), dd2/db = -2 q t.
  // Beyond an end (t clamped to 0 or 1) the other end gets nothing, not 0 * dd2 (NaN stays put).
  const bool past_a = r.t_raw <= 0, past_b = r.t_raw >= 1;
  T gax = past_b ? T(0) : dd2 * T(-2) * r.qx * (1 - r.t);
  T gay = past_b ? T(0) : dd2 * T(-2) * r.qy * (1 - r.t);
  T gbx = past_a ? T(0) : dd2 * T(-2) * r.qx * r.t;
  T gby = past_a ? T(0) : dd2 * T(-2) * r.qy * r.t;
  T gvi = 0, gvj = 0;
  if (P.unc) {
    const T dz = du * r.u * (1 - r.u);
    gvi = dz * (1 - r.t);
    gvj = dz * r.t;
    if (!g.point && r.t_raw >= 0 && r.t_raw <= 1) {  // u depends on t through the interpolation
      const T c = dz * (g.vj - g.vi) / g.len2;
      gax += c * (2 * r.t * g.abx - g.abx - r.apx);
      gay += c * (2 * r.t * g.aby - g.aby - r.apy);
      gbx += c * (r.apx - 2 * r.t * g.abx);
      gby += c * (r.apy - 2 * r.t * g.aby);
    }
  }
  acc[0] += double(go * gax);
  acc[1] += double(go * gay);
  acc[2] += double(go * gbx);
  acc[3] += double(go * gby);
  acc[4] += double(go * gvi);
  acc[5] += double(go * gvj);
  acc[6] += double(go * dw);
  acc[7] += double(go * ds2);
}

// `partial` is scratch of B * bands(H) * E * NGRAD doubles.
template <typename T>
void backward(const Problem<T>& P, const T* grad_out, const int32_t* winner, double* partial, T* grad_edges, int threads) {
  const int64_t bands = (P.H + BAND_H - 1) / BAND_H;
  const std::vector<Edge<T>> geom = all_edges(P, threads);
  // Edges with a non-finite input, by sample: they also pass 0 * (their derivatives) from every
  // pixel they do not win, as autograd through the reference does, so NaN reaches exactly their inputs.
  std::vector<std::vector<int32_t>> nonfinite(P.B);
  for (int64_t b = 0; b < P.B; ++b) {
    for (int64_t e = 0; e < P.E; ++e) {
      if (!geom[b * P.E + e].finite) nonfinite[b].push_back(static_cast<int32_t>(e));
    }
  }
  std::fill(partial, partial + P.B * bands * P.E * NGRAD, 0.0);
  parallel_for(P.B * bands, threads, [&](int64_t item) {
    const int64_t b = item / bands, i0 = (item % bands) * BAND_H, i1 = std::min(i0 + BAND_H, P.H);
    double* acc = partial + item * P.E * NGRAD;
    for (int64_t i = i0; i < i1; ++i) {
      const T py = P.y(i);
      for (int64_t j = 0; j < P.W; ++j) {
        const int64_t o = (b * P.H + i) * P.W + j;
        const int32_t e = winner[o];
        if (e >= 0) accumulate(P, geom[b * P.E + e], P.x(j), py, grad_out[o], acc + e * NGRAD);
        for (const int32_t f : nonfinite[b]) {
          if (f != e) accumulate(P, geom[b * P.E + f], P.x(j), py, T(0), acc + f * NGRAD);
        }
      }
    }
  });
  parallel_for(P.B, threads, [&](int64_t b) {
    for (int64_t k = 0; k < P.E * NGRAD; ++k) {
      double sum = 0.0;
      for (int64_t band = 0; band < bands; ++band) sum += partial[(b * bands + band) * P.E * NGRAD + k];
      grad_edges[b * P.E * NGRAD + k] = static_cast<T>(sum);
    }
  });
}

template <typename T>
Problem<T> problem(const py::array& kp, const py::array& edges, const py::object& unc, const py::object& w,
                   double sigma2, int64_t H, int64_t W, bool precision, double eps) {
  Problem<T> P;
  P.B = kp.shape(0);
  P.K = kp.shape(1);
  P.E = edges.shape(0);
  P.H = H;
  P.W = W;
  P.kp = data_of<T>(kp, "keypoints", {P.B, P.K, 2});
  P.edges = data_of<int32_t>(edges, "edges", {P.E, 2});
  for (int64_t k = 0; k < 2 * P.E; ++k) {
    if (P.edges[k] < 0 || P.edges[k] >= P.K) throw std::invalid_argument("edges: index outside [0, K)");
  }
  P.unc = optional_data_of<T>(unc, "uncertainty", {P.B, P.K});
  P.w_bstride = 0;
  P.w = nullptr;
  if (!w.is_none()) {
    const py::array wa = w.cast<py::array>();
    if (wa.ndim() == 2) {
      P.w = data_of<T>(wa, "edge_weight", {P.B, P.E});
      P.w_bstride = P.E;
    } else {
      P.w = data_of<T>(wa, "edge_weight", {P.E});
    }
  }
  P.s2 = static_cast<T>(sigma2);
  P.eps = static_cast<T>(eps);
  P.precision = precision;
  return P;
}

void forward_py(const py::array& kp, const py::array& edges, const py::object& unc, const py::object& w,
                double sigma2, int64_t H, int64_t W, bool precision, double eps, py::array out,
                py::array winner, int threads) {
  const int64_t B = kp.shape(0);
  int32_t* win = data_of<int32_t>(winner, "winner", {B, H, W});
  with_float_type(kp, [&](auto zero) {
    using T = decltype(zero);
    const auto P = problem<T>(kp, edges, unc, w, sigma2, H, W, precision, eps);
    T* o = data_of<T>(out, "out", {B, H, W});
    py::gil_scoped_release nogil;
    forward(P, o, win, threads);
  });
}

void backward_py(const py::array& grad_out, const py::array& winner, const py::array& kp, const py::array& edges,
                 const py::object& unc, const py::object& w, double sigma2, bool precision, double eps,
                 py::array grad_edges, int threads) {
  const int64_t B = grad_out.shape(0), H = grad_out.shape(1), W = grad_out.shape(2);
  const int32_t* win = data_of<int32_t>(winner, "winner", {B, H, W});
  const int64_t E = edges.shape(0);
  std::unique_ptr<double[]> scratch(new double[B * ((H + BAND_H - 1) / BAND_H) * E * NGRAD]);  // zeroed by backward
  double* partial = scratch.get();
  with_float_type(kp, [&](auto zero) {
    using T = decltype(zero);
    const auto P = problem<T>(kp, edges, unc, w, sigma2, H, W, precision, eps);
    const T* g = data_of<T>(grad_out, "grad_out", {B, H, W});
    T* ge = data_of<T>(grad_edges, "grad_edges", {B, E, NGRAD});
    py::gil_scoped_release nogil;
    backward(P, g, win, partial, ge, threads);
  });
}

}  // namespace

void register_edge_map(py::module_& m) {
  m.def("edge_map_forward", &forward_py, "edge_map forward: writes out [B,H,W] and winner [B,H,W] (int32)");
  m.def("edge_map_backward", &backward_py,
        "edge_map backward: writes per-edge gradients [B,E,EDGE_MAP_NGRAD]");
  m.attr("EDGE_MAP_NGRAD") = NGRAD;
}

}  // namespace kpfast
