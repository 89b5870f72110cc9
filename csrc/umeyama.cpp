// C++ CPU kernels of kpfast.umeyama and kpfast.part_alignment: weighted similarity
// fits solved in registers (2D in closed form, 3D with Horn's quaternion method and a
// cyclic Jacobi eigen-decomposition of the symmetric 4x4 matrix), the residuals of all
// B*B*P per-part fits, and the backward passes (implicit-function derivative of the
// optimal rotation). Semantics and degenerate cases: kpfast/reference.py
// (umeyama_reference, part_alignment_reference, UMEYAMA_TOL).
//
// Every point set is handled in 3 coordinates (z = 0 when D = 2, where the 2D solve
// keeps R's z row and column at the identity), and every fit in its own frame: the
// coordinates shifted by an offset near the weighted centroid (raw second moments then
// lose no precision to cancellation) and divided by a power of two near their largest
// magnitude (exact; float32 moments then neither overflow nor underflow from about 1e-30
// to 1e20). The fit is exactly equivariant to both. A fit with a non-finite coordinate
// or weight among its points is NaN: R, t, s (when fitted), r and every gradient of its
// points.
#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"

namespace kpfast {
namespace {

// Problems below this many point visits run on one thread: waking a second thread costs more.
constexpr int64_t SERIAL_WORK = 1 << 14;

inline int threads_for(int64_t work, int threads) { return work < SERIAL_WORK ? 1 : threads; }

enum Branch : int { NORMAL = 0, NO_SRC = 1, NO_DST = 2, UNCORR = 3, TIE = 4 };

// Per-fit record written by part_alignment's forward for its backward (3-coordinate
// layout for D = 2 and 3): the transform in the fit's frame, 1/W, and for the full
// gradient the adjoints of the moments for a unit upstream gradient of r in the frame.
// Exported as PART_RECORD_LAYOUT; kernels/umeyama.py uses the same layout.
constexpr int REC_A = 0;     // A = s R, 9 (row-major)
constexpr int REC_T = 9;     // t in the frame, 3
constexpr int REC_INVW = 12; // 1 / W (0 when W = 0)
constexpr int REC_SD = 13;   // adjoint of sum c d', 3
constexpr int REC_SS = 16;   // adjoint of sum c s', 3
constexpr int REC_C = 19;    // adjoint of sum c d' s'^T, 9
constexpr int REC_QS = 28;   // adjoint of sum c |s'|^2
constexpr int REC_W = 29;    // adjoint of W
constexpr int NREC = 30;

template <typename T>
struct Tol {
  T spread, corr, tie;
};

template <typename T>
using Vec3 = std::array<T, 3>;
template <typename T>
using Mat3 = std::array<std::array<T, 3>, 3>;

// Raw weighted moments of a (dst d, src s) point set in shifted coordinates.
template <typename T>
struct Moments {
  T W = 0, Qs = 0, Qd = 0;
  Vec3<T> Sd{}, Ss{};
  Mat3<T> C{};

  void add(T c, const Vec3<T>& d, const Vec3<T>& s) {
    W += c;
    for (int a = 0; a < 3; ++a) {
      Sd[a] += c * d[a];
      Ss[a] += c * s[a];
      Qs += c * s[a] * s[a];
      Qd += c * d[a] * d[a];
      for (int b = 0; b < 3; ++b) C[a][b] += c * d[a] * s[b];
    }
  }
};

// Adjoints of Moments' fields.
template <typename T>
struct MomentGrad {
  T W = 0, Qs = 0;
  Vec3<T> Sd{}, Ss{};
  Mat3<T> C{};
};

template <typename T>
struct Fit {
  int branch = NORMAL;
  T invW = 0, var_s = 0, var_d = 0, lam = 0, s = 1;
  Vec3<T> mu_d{}, mu_s{}, t{};  // means and t in shifted coordinates
  Mat3<T> Sig{}, R{}, A{};
  // Rotation modes for the backward: y = sum_l f[l] (v[l] . z) v[l].
  Mat3<T> v{};
  Vec3<T> f{};
};

// Cyclic Jacobi on a symmetric 4x4 matrix: a becomes (nearly) diagonal, columns of V
// the eigenvectors.
template <typename T>
void jacobi4(T a[4][4], T V[4][4]) {
  for (int r = 0; r < 4; ++r)
    for (int c = 0; c < 4; ++c) V[r][c] = (r == c) ? T(1) : T(0);
  const T eps = std::numeric_limits<T>::epsilon();
  for (int sweep = 0; sweep < 10; ++sweep) {
    T off = 0, diag = 0;
    for (int p = 0; p < 4; ++p) {
      diag += a[p][p] * a[p][p];
      for (int q = p + 1; q < 4; ++q) off += a[p][q] * a[p][q];
    }
    if (!(off > T(1e-3) * eps * eps * diag)) break;  // also stops on NaN
    for (int p = 0; p < 3; ++p) {
      for (int q = p + 1; q < 4; ++q) {
        const T apq = a[p][q];
        if (apq == T(0)) continue;
        // t = sign(theta) / (|theta| + sqrt(theta^2 + 1)), theta = (aqq - app) / (2 apq), without
        // dividing by apq (no overflow when it is tiny)
        const T diff = a[q][q] - a[p][p];
        const T den = std::abs(diff) + std::sqrt(diff * diff + 4 * apq * apq);
        if (!(den > 0)) continue;  // apq^2 underflows against a zero diff: apq is negligible
        const T t = (diff < 0 ? -2 * apq : 2 * apq) / den;
        const T c = T(1) / std::sqrt(t * t + 1), s = t * c;
        a[p][p] -= t * apq;
        a[q][q] += t * apq;
        a[p][q] = a[q][p] = 0;
        for (int r = 0; r < 4; ++r) {
          if (r != p && r != q) {
            const T arp = a[r][p], arq = a[r][q];
            a[r][p] = a[p][r] = c * arp - s * arq;
            a[r][q] = a[q][r] = s * arp + c * arq;
          }
          const T vp = V[r][p], vq = V[r][q];
          V[r][p] = c * vp - s * vq;
          V[r][q] = s * vp + c * vq;
        }
      }
    }
  }
}

// R of the unit quaternion q / |q|: orthogonal to rounding whatever the Jacobi drift.
template <typename T>
Mat3<T> quat_to_rot(T w, T x, T y, T z) {
  const T n = T(1) / (w * w + x * x + y * y + z * z);
  Mat3<T> R;
  R[0] = {(w * w + x * x - y * y - z * z) * n, 2 * (x * y - w * z) * n, 2 * (x * z + w * y) * n};
  R[1] = {2 * (x * y + w * z) * n, (w * w - x * x + y * y - z * z) * n, 2 * (y * z - w * x) * n};
  R[2] = {2 * (x * z - w * y) * n, 2 * (y * z + w * x) * n, (w * w - x * x - y * y + z * z) * n};
  return R;
}

// The optimal rotation of Sigma (3D) with Horn's method; fills R, the rotation modes,
// and returns lam1 (the top eigenvalue) and whether the top two eigenvalues tie.
template <typename T>
void solve_rotation3(Fit<T>& F, const Tol<T>& tol, T& lam1, bool& tie) {
  const Mat3<T>& S = F.Sig;
  T a[4][4] = {
      {S[0][0] + S[1][1] + S[2][2], S[2][1] - S[1][2], S[0][2] - S[2][0], S[1][0] - S[0][1]},
      {S[2][1] - S[1][2], S[0][0] - S[1][1] - S[2][2], S[0][1] + S[1][0], S[0][2] + S[2][0]},
      {S[0][2] - S[2][0], S[0][1] + S[1][0], -S[0][0] + S[1][1] - S[2][2], S[1][2] + S[2][1]},
      {S[1][0] - S[0][1], S[0][2] + S[2][0], S[1][2] + S[2][1], -S[0][0] - S[1][1] + S[2][2]},
  };
  T V[4][4];
  jacobi4(a, V);
  int order[4] = {0, 1, 2, 3};
  for (int l = 1; l < 4; ++l) {  // insertion sort, descending eigenvalues
    for (int k = l; k > 0 && a[order[k]][order[k]] > a[order[k - 1]][order[k - 1]]; --k) std::swap(order[k], order[k - 1]);
  }
  T lam[4], q[4][4];
  for (int l = 0; l < 4; ++l) {
    lam[l] = a[order[l]][order[l]];
    for (int r = 0; r < 4; ++r) q[l][r] = V[r][order[l]];
  }
  lam1 = lam[0];
  T qs[4] = {q[0][0], q[0][1], q[0][2], q[0][3]};
  tie = false;
  if (lam[0] - lam[1] <= tol.tie * lam[0]) {
    // Top eigenspace span(q0, q1): the member closest to the identity quaternion.
    const T p0 = q[0][0], p1 = q[1][0];
    const T n2 = p0 * p0 + p1 * p1;
    if (n2 > T(5e-7)) {
      const T inv = T(1) / std::sqrt(n2);
      for (int r = 0; r < 4; ++r) qs[r] = (p0 * q[0][r] + p1 * q[1][r]) * inv;
      tie = true;
    }
  }
  F.R = quat_to_rot(qs[0], qs[1], qs[2], qs[3]);
  const T qn = T(1) / std::sqrt(qs[0] * qs[0] + qs[1] * qs[1] + qs[2] * qs[2] + qs[3] * qs[3]);
  for (int r = 0; r < 4; ++r) qs[r] *= qn;
  // Modes l = 1..3: body-frame axes v = vec(conj(qs) * q_l), half-gaps (lam1 - lam_l) / 2.
  for (int l = 1; l < 4; ++l) {
    const T w2 = q[l][0];
    const Vec3<T> v1 = {qs[1], qs[2], qs[3]}, v2 = {q[l][1], q[l][2], q[l][3]};
    const Vec3<T> cr = {v1[1] * v2[2] - v1[2] * v2[1], v1[2] * v2[0] - v1[0] * v2[2], v1[0] * v2[1] - v1[1] * v2[0]};
    for (int c = 0; c < 3; ++c) F.v[l - 1][c] = qs[0] * v2[c] - w2 * v1[c] - cr[c];
    const T g = (lam[0] - lam[l]) / 2;
    F.f[l - 1] = (2 * g > tol.tie * lam[0]) ? T(1) / g : T(0);
  }
}

template <typename T>
void set_identity(Mat3<T>& R) {
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 3; ++b) R[a][b] = (a == b) ? T(1) : T(0);
}

// Fit from the moments taken in a frame; od, os: the frame's origins in its own units.
template <typename T>
Fit<T> solve(const Moments<T>& M, const Vec3<T>& od, const Vec3<T>& os, int D, bool scale, const Tol<T>& tol) {
  Fit<T> F;
  F.invW = M.W > 0 ? T(1) / M.W : T(0);
  T msq_s = 0, msq_d = 0, mus2 = 0, mud2 = 0;
  for (int a = 0; a < 3; ++a) {
    F.mu_d[a] = M.Sd[a] * F.invW;
    F.mu_s[a] = M.Ss[a] * F.invW;
    mus2 += F.mu_s[a] * F.mu_s[a];
    mud2 += F.mu_d[a] * F.mu_d[a];
    msq_s += (F.mu_s[a] + os[a]) * (F.mu_s[a] + os[a]);
    msq_d += (F.mu_d[a] + od[a]) * (F.mu_d[a] + od[a]);
  }
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 3; ++b) F.Sig[a][b] = M.C[a][b] * F.invW - F.mu_d[a] * F.mu_s[b];
  F.var_s = M.Qs * F.invW - mus2;
  F.var_d = M.Qd * F.invW - mud2;
  msq_s += F.var_s;
  msq_d += F.var_d;

  T lam1 = 0;
  bool tie = false;
  if (D == 3) {
    solve_rotation3(F, tol, lam1, tie);
  } else {
    const T a = F.Sig[0][0] + F.Sig[1][1], b = F.Sig[1][0] - F.Sig[0][1];
    lam1 = std::sqrt(a * a + b * b);
    set_identity(F.R);
    if (lam1 > 0) {
      F.R[0][0] = a / lam1;
      F.R[0][1] = -b / lam1;
      F.R[1][0] = b / lam1;
      F.R[1][1] = a / lam1;
      F.f[0] = T(1) / lam1;
    }
    F.v[0] = {T(0), T(0), T(1)};
  }
  if (F.var_s <= tol.spread * msq_s) {
    F.branch = NO_SRC;
  } else if (F.var_d <= tol.spread * msq_d) {
    F.branch = NO_DST;
  } else if (lam1 <= tol.corr * std::sqrt(F.var_s * F.var_d)) {
    F.branch = UNCORR;
  } else {
    F.branch = tie ? TIE : NORMAL;
  }
  if (F.branch == NO_SRC || F.branch == NO_DST || F.branch == UNCORR) set_identity(F.R);
  T lam = 0;
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 3; ++b) lam += F.R[a][b] * F.Sig[a][b];
  F.lam = lam;
  if (!scale || F.branch == NO_SRC) {
    F.s = 1;
  } else if (F.branch == NO_DST) {
    F.s = 0;
  } else {
    F.s = lam / F.var_s;
  }
  for (int a = 0; a < 3; ++a) {
    T ams = 0;
    for (int b = 0; b < 3; ++b) {
      F.A[a][b] = F.s * F.R[a][b];
      ams += F.A[a][b] * F.mu_s[b];
    }
    F.t[a] = F.mu_d[a] - ams;
  }
  return F;
}

// Backward of solve: from the adjoints of R, s and the means (shifted), the adjoints of
// the moments.
template <typename T>
MomentGrad<T> solve_backward(const Fit<T>& F, const Moments<T>& M, const Mat3<T>& Rbar, T sbar, Vec3<T> mubar_d,
                             Vec3<T> mubar_s, bool scale) {
  MomentGrad<T> G;
  if (F.invW == 0) return G;
  Mat3<T> Sbar{};
  T varbar = 0;
  const bool optimal = F.branch == NORMAL || F.branch == TIE;
  if (scale && (optimal || F.branch == UNCORR)) {  // s = lam / var_s, d lam / d Sigma = R
    const T lambar = sbar / F.var_s;
    varbar = -sbar * F.s / F.var_s;
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b) Sbar[a][b] = lambar * F.R[a][b];
  }
  if (optimal) {  // dSigma += R [y]_x with y = H^+ z, z = vee(Z - Z^T), Z = R^T Rbar
    Mat3<T> Z{};
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b)
        for (int c = 0; c < 3; ++c) Z[a][b] += F.R[c][a] * Rbar[c][b];
    const Vec3<T> z = {Z[2][1] - Z[1][2], Z[0][2] - Z[2][0], Z[1][0] - Z[0][1]};
    Vec3<T> y{};
    for (int l = 0; l < 3; ++l) {
      const T k = F.f[l] * (F.v[l][0] * z[0] + F.v[l][1] * z[1] + F.v[l][2] * z[2]);
      for (int c = 0; c < 3; ++c) y[c] += k * F.v[l][c];
    }
    const Mat3<T> Y = {{{T(0), -y[2], y[1]}, {y[2], T(0), -y[0]}, {-y[1], y[0], T(0)}}};
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b)
        for (int c = 0; c < 3; ++c) Sbar[a][b] += F.R[a][c] * Y[c][b];
  }
  // Sigma = C / W - mu_d mu_s^T;  var_s = Qs / W - |mu_s|^2;  mu = S / W.
  T Wbar = 0;
  for (int a = 0; a < 3; ++a) {
    for (int b = 0; b < 3; ++b) {
      G.C[a][b] = Sbar[a][b] * F.invW;
      Wbar -= Sbar[a][b] * M.C[a][b];
      mubar_d[a] -= Sbar[a][b] * F.mu_s[b];
      mubar_s[b] -= Sbar[a][b] * F.mu_d[a];
    }
    mubar_s[a] -= 2 * varbar * F.mu_s[a];
  }
  Wbar *= F.invW * F.invW;
  G.Qs = varbar * F.invW;
  Wbar -= varbar * M.Qs * F.invW * F.invW;
  for (int a = 0; a < 3; ++a) {
    G.Sd[a] = mubar_d[a] * F.invW;
    G.Ss[a] = mubar_s[a] * F.invW;
    Wbar -= (mubar_d[a] * F.mu_d[a] + mubar_s[a] * F.mu_s[a]) * F.invW;
  }
  G.W = Wbar;
  return G;
}

// Gradients of one point (d, s, weight c) from the moment adjoints.
template <typename T>
void point_grad(const MomentGrad<T>& G, T c, const Vec3<T>& d, const Vec3<T>& s, Vec3<T>& gd, Vec3<T>& gs, T& gc) {
  gc = G.W;
  for (int a = 0; a < 3; ++a) {
    T Cs = 0, CTd = 0;
    for (int b = 0; b < 3; ++b) {
      Cs += G.C[a][b] * s[b];
      CTd += G.C[b][a] * d[b];
    }
    gd[a] = c * (G.Sd[a] + Cs);
    gs[a] = c * (G.Ss[a] + CTd + 2 * G.Qs * s[a]);
    gc += G.Sd[a] * d[a] + G.Ss[a] * s[a] + d[a] * Cs + G.Qs * s[a] * s[a];
  }
}

// The largest power of two <= m (dividing by it is exact): m with its mantissa bits cleared (no
// libm call: this runs once per fit); 1 when m is 0, subnormal or not finite.
template <typename T>
T pow2_floor(T m) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits exponent = sizeof(T) == 4 ? Bits(0x7F800000u) : Bits(0x7FF0000000000000ull);
  if (!(m >= std::numeric_limits<T>::min() && m <= std::numeric_limits<T>::max())) return T(1);
  Bits bits;
  std::memcpy(&bits, &m, sizeof(T));
  bits &= exponent;
  std::memcpy(&m, &bits, sizeof(T));
  return m;
}

// A fit's coordinate frame: x' = (x - o) / k, with k a power of two (so that 1 / k is exact).
template <typename T>
struct Frame {
  Vec3<T> o{};
  T k = 1, ik = 1;

  void set_scale(T k_) {
    k = k_;
    ik = T(1) / k_;
  }
  Vec3<T> in(const T* p, int D) const {  // D is 2 or 3 (no loop: the result stays in registers)
    return {(p[0] - o[0]) * ik, (p[1] - o[1]) * ik, D == 3 ? (p[2] - o[2]) * ik : T(0)};
  }
  Vec3<T> origin() const { return {o[0] * ik, o[1] * ik, o[2] * ik}; }  // in its own units
};

// A point and its weight are finite.
template <typename T>
bool finite_point(const T* p, int D, T c) {
  bool ok = std::isfinite(c);
  for (int a = 0; a < D; ++a) ok = ok && std::isfinite(p[a]);
  return ok;
}

template <typename T>
inline T sgn(T x) {
  return T((x > 0) - (x < 0));
}

// ------------------------------------------------------------------ umeyama

template <typename T>
struct UProblem {
  const T *src, *dst, *w;
  int64_t N, M;
  int D;
  bool scale;
  Tol<T> tol;

  T weight(int64_t n, int64_t m) const { return w ? w[n * M + m] : T(1); }
  const T* s_at(int64_t n, int64_t m) const { return src + (n * M + m) * D; }
  const T* d_at(int64_t n, int64_t m) const { return dst + (n * M + m) * D; }

  // Two passes: the frames (centroids, one scale for src and dst so that a rigid fit stays
  // rigid) and whether every input is finite, then the moments in the frames.
  bool moments(int64_t n, Frame<T>& fs, Frame<T>& fd, Moments<T>& Mo) const {
    T W = 0, big = 0;
    fs = Frame<T>();
    fd = Frame<T>();
    for (int64_t m = 0; m < M; ++m) {
      const T c = weight(n, m);
      const T *s = s_at(n, m), *d = d_at(n, m);
      T size = 0;
      W += c;
      for (int a = 0; a < D; ++a) {
        fs.o[a] += c * s[a];
        fd.o[a] += c * d[a];
        size = std::max(size, std::max(std::abs(s[a]), std::abs(d[a])));
      }
      if (c != 0) big = std::max(big, size);
    }
    // A non-finite input makes a sum non-finite (0 * inf is NaN); so may an overflow: then look.
    bool ok = std::isfinite(W);
    for (int a = 0; a < 3; ++a) ok = ok && std::isfinite(fs.o[a]) && std::isfinite(fd.o[a]);
    if (!ok) {
      ok = true;
      for (int64_t m = 0; m < M; ++m)
        ok = ok && finite_point(s_at(n, m), D, weight(n, m)) && finite_point(d_at(n, m), D, weight(n, m));
    }
    const T inv = W > 0 ? T(1) / W : T(0);
    for (int a = 0; a < 3; ++a) {
      fs.o[a] *= inv;
      fd.o[a] *= inv;
    }
    fs.set_scale(pow2_floor(big));
    fd.set_scale(fs.k);
    Mo = Moments<T>();
    for (int64_t m = 0; m < M; ++m) Mo.add(weight(n, m), fd.in(d_at(n, m), D), fs.in(s_at(n, m), D));
    return ok;
  }
};

template <typename T>
void umeyama_forward(const UProblem<T>& P, T* R, T* s, T* t, int threads) {
  parallel_for(P.N, threads_for(P.N * (P.M + 64), threads), [&](int64_t n) {
    Frame<T> fs, fd;
    Moments<T> Mo;
    const bool ok = P.moments(n, fs, fd, Mo);
    const Fit<T> F = solve(Mo, fd.origin(), fs.origin(), P.D, P.scale, P.tol);
    const int D = P.D;
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (int a = 0; a < D; ++a) {
      T aos = 0;
      for (int b = 0; b < D; ++b) {
        R[(n * D + a) * D + b] = ok ? F.R[a][b] : nan;
        aos += F.A[a][b] * fs.o[b];
      }
      t[n * D + a] = ok ? fd.o[a] + fd.k * F.t[a] - aos : nan;  // back from the frames
    }
    s[n] = ok || !P.scale ? F.s : nan;
  });
}

template <typename T>
void umeyama_backward(const UProblem<T>& P, const T* gR, const T* gs, const T* gt, T* g_src, T* g_dst, T* g_w,
                      int threads) {
  parallel_for(P.N, threads_for(P.N * (P.M + 64), threads), [&](int64_t n) {
    const int D = P.D;
    Frame<T> fs, fd;
    Moments<T> Mo;
    const bool ok = P.moments(n, fs, fd, Mo);
    if (!ok) {
      const T nan = std::numeric_limits<T>::quiet_NaN();
      std::fill(g_src + n * P.M * D, g_src + (n + 1) * P.M * D, nan);
      std::fill(g_dst + n * P.M * D, g_dst + (n + 1) * P.M * D, nan);
      std::fill(g_w + n * P.M, g_w + (n + 1) * P.M, nan);
      return;
    }
    const Fit<T> F = solve(Mo, fd.origin(), fs.origin(), D, P.scale, P.tol);
    // t = od + k (mu_d - A (mu_s + os)) with the means and origins in the frame, A = s R: the
    // adjoint of the frame's t is k tbar.
    const Vec3<T> os = fs.origin();
    Vec3<T> tbar{}, mubar_d{}, mubar_s{};
    Mat3<T> Rbar{}, Abar{};
    for (int a = 0; a < D; ++a) {
      tbar[a] = gt[n * D + a] * fd.k;
      for (int b = 0; b < D; ++b) Rbar[a][b] = gR[(n * D + a) * D + b];
    }
    for (int a = 0; a < 3; ++a) {
      mubar_d[a] = tbar[a];
      for (int b = 0; b < 3; ++b) {
        Abar[a][b] = -tbar[a] * (F.mu_s[b] + os[b]);
        mubar_s[b] -= F.A[a][b] * tbar[a];
      }
    }
    T sbar = P.scale ? gs[n] : T(0);
    for (int a = 0; a < 3; ++a)
      for (int b = 0; b < 3; ++b) {
        sbar += P.scale ? Abar[a][b] * F.R[a][b] : T(0);
        Rbar[a][b] += F.s * Abar[a][b];
      }
    const MomentGrad<T> G = solve_backward(F, Mo, Rbar, sbar, mubar_d, mubar_s, P.scale);
    for (int64_t m = 0; m < P.M; ++m) {
      const T c = P.weight(n, m);
      Vec3<T> gd, gsrc;
      T gc;
      point_grad(G, c, fd.in(P.d_at(n, m), D), fs.in(P.s_at(n, m), D), gd, gsrc, gc);
      for (int a = 0; a < D; ++a) {  // d x' / d x = 1 / k
        g_dst[(n * P.M + m) * D + a] = gd[a] * fd.ik;
        g_src[(n * P.M + m) * D + a] = gsrc[a] * fs.ik;
      }
      g_w[n * P.M + m] = gc;
    }
  });
}

// ------------------------------------------------------------------ part_alignment

template <typename T>
struct PProblem {
  const T* x;        // [B, K, D]
  const uint8_t* m;  // [P, K]
  const T* w;        // [B, K] or nullptr
  int64_t B, K, P;
  int D;
  bool scale, full;
  Tol<T> tol;
  std::vector<std::vector<int32_t>> members;  // point indices of each part
  std::vector<int64_t> first;                 // [P + 1]: where each part's members start in a sample's row
  std::vector<Frame<T>> frames;               // [B, P]: weighted centroid; one power-of-two scale per part
  std::vector<uint8_t> finite;                // [B, P]: every point and weight of the part is finite
  std::vector<Vec3<T>> local;                 // [B, first[P]]: the members in their frames
  std::vector<T> weight;                      // [B, first[P]]: their weights

  // The frames (one scale per part for every sample, so that the frames of a fit share it and a
  // rigid fit stays rigid) and the member points in them, contiguous per (sample, part).
  void prepare(int threads) {
    members.assign(P, {});
    first.assign(P + 1, 0);
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t k = 0; k < K; ++k)
        if (m[p * K + k]) members[p].push_back(static_cast<int32_t>(k));
      first[p + 1] = first[p] + static_cast<int64_t>(members[p].size());
    }
    frames.assign(B * P, Frame<T>());
    finite.assign(B * P, 1);
    std::vector<T> big(B * P, T(0));
    parallel_for(B, threads_for(B * P * K, threads), [&](int64_t b) {
      for (int64_t p = 0; p < P; ++p) {
        T W = 0;
        Frame<T>& f = frames[b * P + p];
        for (int32_t k : members[p]) {
          const T c = wt(b, k);
          if (!finite_point(at(b, k), D, c)) finite[b * P + p] = 0;
          W += c;
          for (int a = 0; a < D; ++a) {
            f.o[a] += c * at(b, k)[a];
            if (c != 0 && std::isfinite(at(b, k)[a])) big[b * P + p] = std::max(big[b * P + p], std::abs(at(b, k)[a]));
          }
        }
        for (int a = 0; a < 3; ++a) f.o[a] = W > 0 ? f.o[a] / W : T(0);
      }
    });
    for (int64_t p = 0; p < P; ++p) {
      T top = 0;
      for (int64_t b = 0; b < B; ++b) top = std::max(top, big[b * P + p]);
      for (int64_t b = 0; b < B; ++b) frames[b * P + p].set_scale(pow2_floor(top));
    }
    local.assign(B * first[P], Vec3<T>{});
    weight.assign(B * first[P], T(0));
    parallel_for(B, threads_for(B * first[P], threads), [&](int64_t b) {
      for (int64_t p = 0; p < P; ++p)
        for (size_t q = 0; q < members[p].size(); ++q) {
          local[b * first[P] + first[p] + q] = frames[b * P + p].in(at(b, members[p][q]), D);
          weight[b * first[P] + first[p] + q] = wt(b, members[p][q]);
        }
    });
  }
  const Frame<T>& frame(int64_t b, int64_t p) const { return frames[b * P + p]; }
  bool finite_fit(int64_t i, int64_t j, int64_t p) const { return finite[i * P + p] && finite[j * P + p]; }
  const Vec3<T>* points(int64_t b, int64_t p) const { return local.data() + b * first[P] + first[p]; }
  const T* weights(int64_t b, int64_t p) const { return weight.data() + b * first[P] + first[p]; }
  T wt(int64_t b, int64_t k) const { return w ? w[b * K + k] : T(1); }
  const T* at(int64_t b, int64_t k) const { return x + (b * K + k) * D; }
};

template <typename T>
void part_forward(const PProblem<T>& P, T* r, T* rec, int threads) {
  const int64_t B = P.B, NP = P.P;
  parallel_for(B * B, threads_for(B * B * (NP * 64 + P.K), threads), [&](int64_t ij) {
    const int64_t i = ij / B, j = ij % B;
    for (int64_t p = 0; p < NP; ++p) {
      const int64_t fit = ij * NP + p;
      T* out = rec + fit * NREC;
      std::fill(out, out + NREC, T(0));
      r[fit] = 0;
      if (i == j) continue;  // the self-fit is exact: r = 0, no gradient
      if (!P.finite_fit(i, j, p)) {
        std::fill(out, out + NREC, std::numeric_limits<T>::quiet_NaN());
        r[fit] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const Frame<T>&fd = P.frame(i, p), &fs = P.frame(j, p);
      const Vec3<T>*xi = P.points(i, p), *xj = P.points(j, p);
      const T *wi = P.weights(i, p), *wj = P.weights(j, p);
      const int64_t n = P.members[p].size();
      Moments<T> Mo;
      for (int64_t q = 0; q < n; ++q) Mo.add(wi[q] * wj[q], xi[q], xj[q]);
      const Fit<T> F = solve(Mo, fd.origin(), fs.origin(), P.D, P.scale, P.tol);
      T res = 0;
      Mat3<T> Es{};
      Vec3<T> Ec{};
      for (int64_t q = 0; q < n; ++q) {
        const T c = wi[q] * wj[q];
        const Vec3<T>&d = xi[q], &s = xj[q];
        for (int a = 0; a < P.D; ++a) {
          const T e = d[a] - (F.A[a][0] * s[0] + F.A[a][1] * s[1] + F.A[a][2] * s[2]) - F.t[a];
          res += c * std::abs(e);
          if (P.full) {
            const T h = c * sgn(e);
            Ec[a] += h;
            for (int b = 0; b < 3; ++b) Es[a][b] += h * s[b];
          }
        }
      }
      r[fit] = res * F.invW * fd.k;  // the residual in the frame, times its scale
      for (int a = 0; a < 3; ++a) {
        out[REC_T + a] = F.t[a];
        for (int b = 0; b < 3; ++b) out[REC_A + 3 * a + b] = F.A[a][b];
      }
      out[REC_INVW] = F.invW;
      if (!P.full || F.invW == 0) continue;
      // Unit upstream gradient of r in the frame: e_k = d_k - A s_k - t, t = mu_d - A mu_s.
      Vec3<T> tbar, mubar_d, mubar_s{};
      Mat3<T> Abar, Rbar;
      for (int a = 0; a < 3; ++a) {
        tbar[a] = -Ec[a] * F.invW;
        mubar_d[a] = tbar[a];
      }
      T sbar = 0;
      for (int a = 0; a < 3; ++a) {
        for (int b = 0; b < 3; ++b) {
          Abar[a][b] = -Es[a][b] * F.invW - tbar[a] * F.mu_s[b];
          mubar_s[b] -= F.A[a][b] * tbar[a];
        }
      }
      for (int a = 0; a < 3; ++a)
        for (int b = 0; b < 3; ++b) {
          sbar += Abar[a][b] * F.R[a][b];
          Rbar[a][b] = F.s * Abar[a][b];
        }
      const MomentGrad<T> G = solve_backward(F, Mo, Rbar, sbar, mubar_d, mubar_s, P.scale);
      for (int a = 0; a < 3; ++a) {
        out[REC_SD + a] = G.Sd[a];
        out[REC_SS + a] = G.Ss[a];
        for (int b = 0; b < 3; ++b) out[REC_C + 3 * a + b] = G.C[a][b];
      }
      out[REC_QS] = G.Qs;
      out[REC_W] = G.W;
    }
  });
}

// One fit's record, scaled by its upstream gradient, ready for the per-point gradients.
// In the fit's frame r = k r' and x' = (x - o) / k, so dr/dx = dr'/dx' and dr/dc = k dr'/dc:
// built with g = k grad_r and r = r' (point gradients in the frame, divided by k by the caller).
template <typename T>
struct FitGrad {
  MomentGrad<T> G;  // moment adjoints times g (zero unless full)
  Mat3<T> A;
  Vec3<T> t;
  T g, gi, r;  // g, g / W, the fit's value

  FitGrad(const T* rec, T g_, T r_, bool full) : g(g_), r(r_) {
    for (int a = 0; a < 3; ++a) {
      t[a] = rec[REC_T + a];
      for (int b = 0; b < 3; ++b) A[a][b] = rec[REC_A + 3 * a + b];
    }
    gi = g * rec[REC_INVW];
    if (full) {
      for (int a = 0; a < 3; ++a) {
        G.Sd[a] = g * rec[REC_SD + a];
        G.Ss[a] = g * rec[REC_SS + a];
        for (int b = 0; b < 3; ++b) G.C[a][b] = g * rec[REC_C + 3 * a + b];
      }
      G.Qs = g * rec[REC_QS];
      G.W = g * rec[REC_W];
    }
  }

  // Gradient w.r.t. the fit's dst point d, src point s and weight c: the explicit residual
  // term plus the moment adjoints.
  void point(T c, const Vec3<T>& d, const Vec3<T>& s, int D, Vec3<T>& gd, Vec3<T>& gs, T& gc) const {
    point_grad(G, c, d, s, gd, gs, gc);
    T l1 = 0;
    for (int a = 0; a < D; ++a) {
      const T e = d[a] - (A[a][0] * s[0] + A[a][1] * s[1] + A[a][2] * s[2]) - t[a];
      l1 += std::abs(e);
      const T h = gi * c * sgn(e);
      gd[a] += h;
      for (int b = 0; b < 3; ++b) gs[b] -= A[a][b] * h;
    }
    gc += gi * (l1 - r);
  }
};

template <typename T>
void part_backward(const PProblem<T>& P, const T* grad_r, const T* r, const T* rec, T* gx, T* gw, int threads) {
  const int64_t B = P.B, NP = P.P, K = P.K;
  const int D = P.D;
  parallel_for(B, threads_for(B * B * (NP + P.K), threads), [&](int64_t n) {
    std::fill(gx + n * K * D, gx + (n + 1) * K * D, T(0));
    std::fill(gw + n * K, gw + (n + 1) * K, T(0));
    for (int64_t p = 0; p < NP; ++p) {
      for (int64_t m = 0; m < B; ++m) {
        if (m == n) continue;
        const int64_t as_dst = (n * B + m) * NP + p, as_src = (m * B + n) * NP + p;
        if (rec[as_dst * NREC + REC_INVW] == 0) continue;  // W = 0 for both roles
        // a fit whose upstream gradient is 0 contributes nothing, unless it is NaN (then NaN)
        const bool nan = std::isnan(rec[as_dst * NREC + REC_INVW]);
        const T g1 = grad_r[as_dst], g2 = grad_r[as_src];
        const bool use1 = g1 != T(0) || nan, use2 = g2 != T(0) || nan;
        if (!use1 && !use2) continue;
        const T k = P.frame(n, p).k, ik = P.frame(n, p).ik;  // the part's scale, the same in both roles
        const FitGrad<T> F1(rec + as_dst * NREC, g1 * k, r[as_dst] * ik, P.full);  // n is the target of (n, m, p)
        const FitGrad<T> F2(rec + as_src * NREC, g2 * k, r[as_src] * ik, P.full);  // n is the source of (m, n, p)
        const Vec3<T>*xn = P.points(n, p), *xm = P.points(m, p);
        const T *wn = P.weights(n, p), *wm = P.weights(m, p);
        for (size_t q = 0; q < P.members[p].size(); ++q) {
          const T c = wn[q] * wm[q];
          Vec3<T> gd, gs;
          T gc, acc_c = 0;
          T* out = gx + (n * K + P.members[p][q]) * D;
          if (use1) {
            F1.point(c, xn[q], xm[q], D, gd, gs, gc);
            for (int a = 0; a < D; ++a) out[a] += gd[a] * ik;
            acc_c += gc;
          }
          if (use2) {
            F2.point(c, xm[q], xn[q], D, gd, gs, gc);
            for (int a = 0; a < D; ++a) out[a] += gs[a] * ik;
            acc_c += gc;
          }
          gw[n * K + P.members[p][q]] += acc_c * wm[q];
        }
      }
    }
  });
}

// ------------------------------------------------------------------ bindings

template <typename T>
Tol<T> tolerances(double spread, double corr, double tie) {
  return {static_cast<T>(spread), static_cast<T>(corr), static_cast<T>(tie)};
}

template <typename T>
UProblem<T> uproblem(const py::array& src, const py::array& dst, const py::object& w, bool scale, double spread,
                     double corr, double tie) {
  UProblem<T> P;
  P.N = src.shape(0);
  P.M = src.shape(1);
  P.D = static_cast<int>(src.shape(2));
  if (P.D != 2 && P.D != 3) throw std::invalid_argument("src: D must be 2 or 3");
  P.src = data_of<T>(src, "src", {P.N, P.M, P.D});
  P.dst = data_of<T>(dst, "dst", {P.N, P.M, P.D});
  P.w = optional_data_of<T>(w, "weights", {P.N, P.M});
  P.scale = scale;
  P.tol = tolerances<T>(spread, corr, tie);
  return P;
}

void umeyama_forward_py(const py::array& src, const py::array& dst, const py::object& w, bool scale, double spread,
                        double corr, double tie, py::array R, py::array s, py::array t, int threads) {
  with_float_type(src, [&](auto zero) {
    using T = decltype(zero);
    const auto P = uproblem<T>(src, dst, w, scale, spread, corr, tie);
    T* Rp = data_of<T>(R, "R", {P.N, P.D, P.D});
    T* sp = data_of<T>(s, "s", {P.N});
    T* tp = data_of<T>(t, "t", {P.N, P.D});
    py::gil_scoped_release nogil;
    umeyama_forward(P, Rp, sp, tp, threads);
  });
}

void umeyama_backward_py(const py::array& gR, const py::array& gs, const py::array& gt, const py::array& src,
                         const py::array& dst, const py::object& w, bool scale, double spread, double corr, double tie,
                         py::array g_src, py::array g_dst, py::array g_w, int threads) {
  with_float_type(src, [&](auto zero) {
    using T = decltype(zero);
    const auto P = uproblem<T>(src, dst, w, scale, spread, corr, tie);
    const T* gRp = data_of<T>(gR, "grad_R", {P.N, P.D, P.D});
    const T* gsp = data_of<T>(gs, "grad_s", {P.N});
    const T* gtp = data_of<T>(gt, "grad_t", {P.N, P.D});
    T* a = data_of<T>(g_src, "grad_src", {P.N, P.M, P.D});
    T* b = data_of<T>(g_dst, "grad_dst", {P.N, P.M, P.D});
    T* c = data_of<T>(g_w, "grad_weights", {P.N, P.M});
    py::gil_scoped_release nogil;
    umeyama_backward(P, gRp, gsp, gtp, a, b, c, threads);
  });
}

template <typename T>
PProblem<T> pproblem(const py::array& x, const py::array& parts, const py::object& w, bool scale, bool full,
                     double spread, double corr, double tie) {
  PProblem<T> P;
  P.B = x.shape(0);
  P.K = x.shape(1);
  P.D = static_cast<int>(x.shape(2));
  if (P.D != 2 && P.D != 3) throw std::invalid_argument("points: D must be 2 or 3");
  P.P = parts.shape(0);
  P.x = data_of<T>(x, "points", {P.B, P.K, P.D});
  P.m = data_of<uint8_t>(parts, "parts", {P.P, P.K});
  P.w = optional_data_of<T>(w, "weights", {P.B, P.K});
  P.scale = scale;
  P.full = full;
  P.tol = tolerances<T>(spread, corr, tie);
  return P;
}

void part_forward_py(const py::array& x, const py::array& parts, const py::object& w, bool scale, bool full,
                     double spread, double corr, double tie, py::array r, py::array rec, int threads) {
  with_float_type(x, [&](auto zero) {
    using T = decltype(zero);
    auto P = pproblem<T>(x, parts, w, scale, full, spread, corr, tie);
    T* rp = data_of<T>(r, "r", {P.B, P.B, P.P});
    T* recp = data_of<T>(rec, "record", {P.B, P.B, P.P, NREC});
    py::gil_scoped_release nogil;
    P.prepare(threads);
    part_forward(P, rp, recp, threads);
  });
}

void part_backward_py(const py::array& grad_r, const py::array& r, const py::array& rec, const py::array& x,
                      const py::array& parts, const py::object& w, bool scale, bool full, py::array gx, py::array gw,
                      int threads) {
  with_float_type(x, [&](auto zero) {
    using T = decltype(zero);
    auto P = pproblem<T>(x, parts, w, scale, full, 0, 0, 0);
    const T* g = data_of<T>(grad_r, "grad_r", {P.B, P.B, P.P});
    const T* rp = data_of<T>(r, "r", {P.B, P.B, P.P});
    const T* recp = data_of<T>(rec, "record", {P.B, P.B, P.P, NREC});
    T* gxp = data_of<T>(gx, "grad_points", {P.B, P.K, P.D});
    T* gwp = data_of<T>(gw, "grad_weights", {P.B, P.K});
    py::gil_scoped_release nogil;
    P.prepare(threads);
    part_backward(P, g, rp, recp, gxp, gwp, threads);
  });
}

}  // namespace

void register_umeyama(py::module_& m) {
  m.attr("PART_RECORD_SIZE") = NREC;
  py::dict layout;
  const std::pair<const char*, int> fields[] = {{"A", REC_A},   {"t", REC_T},   {"inv_W", REC_INVW},
                                                {"Sd", REC_SD}, {"Ss", REC_SS}, {"C", REC_C},
                                                {"Qs", REC_QS}, {"W", REC_W},   {"size", NREC}};
  for (const auto& [name, offset] : fields) layout[name] = offset;
  m.attr("PART_RECORD_LAYOUT") = layout;
  m.def("umeyama_forward", &umeyama_forward_py, "umeyama forward: writes R [N,D,D], s [N], t [N,D]");
  m.def("umeyama_backward", &umeyama_backward_py,
        "umeyama backward: writes grad_src, grad_dst [N,M,D] and grad_weights [N,M]");
  m.def("part_alignment_forward", &part_forward_py,
        "part_alignment forward: writes r [B,B,P] and the per-fit records [B,B,P,PART_RECORD_SIZE]");
  m.def("part_alignment_backward", &part_backward_py,
        "part_alignment backward: writes grad_points [B,K,D] and grad_weights [B,K]");
}

}  // namespace kpfast
