// The "cpu" backend's recipe rows in one fused loop per row: soft-capping, class weights and z-loss in C++.
//
// ``cpu_kernel.py`` compiles this file on first use with the machine's C++ compiler (-O3 -march=native) and
// calls ``smoothce_recipe_rows`` through ctypes, which lets go of the GIL: each of its worker threads runs
// a range of rows. The math is ``cpu_recipe.recipe_rows``'s (its docstring); per row, on
// z'_j = c t_j, t_j = tanh(z_j / c) (z' = z without a cap), in fp32:
//
//   pass 1  t_j into a row of scratch (with a cap), and m = max_j z'_j (0 where it is not finite);
//   pass 2  d_j = z'_j - m, the smoothing sum sum_j w_j d_j (all terms <= 0), e_j = exp(d_j) kept in the
//           gradient's row (fp32) or a row of scratch, q = sum_{j != k} e_j and e_k apart, S = q + e_k;
//   pass 3  grad_j = (a e_j + b w_j) (1 - t_j^2), a = (coeff + z_coeff lse) / S, lse = m + log S, b the
//           column factor, rounded once to the gradient's dtype (its target column is written afterwards).
//
// A row is read from memory once: its scratch (one or two rows of fp32) stays in the core's cache. Sums
// run in 16 lanes, each a sum of at most CHUNK / 16 terms before it joins a second level: a lane's
// error stays at a few ulps whatever V. exp and tanh are this file's own, vectorized (GCC vector
// extensions, lowered to whatever -march=native gives: run on AVX-512, AVX2 and SSE4.2 builds, compiled
// for aarch64), each within about an ulp.

#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int L = 16;  // lanes of a vector
constexpr int64_t CHUNK = 1024;  // elements per first-level sum
typedef float vf __attribute__((vector_size(4 * L)));
typedef int32_t vi __attribute__((vector_size(4 * L)));
typedef uint32_t vu __attribute__((vector_size(4 * L)));
typedef uint16_t vh __attribute__((vector_size(2 * L)));

enum Type { F32 = 0, BF16 = 1, F16 = 2 };

inline vf splat(float x) { return vf{} + x; }
const vf LANE = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
inline vf bits_to_float(vu u) { return (vf)u; }
inline vu float_to_bits(vf v) { return (vu)v; }

// Loads and stores of L elements of one dtype as fp32; the stores round to nearest even, once.
template <int T> struct Io;
template <> struct Io<F32> {
  typedef float scalar;
  static vf load(const scalar* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(scalar* p, vf v) { std::memcpy(p, &v, sizeof v); }
  static float to_float(scalar x) { return x; }
};
template <> struct Io<BF16> {
  typedef uint16_t scalar;
  static vf load(const scalar* p) {
    vh h; std::memcpy(&h, p, sizeof h);
    return bits_to_float(__builtin_convertvector(h, vu) << 16);
  }
  static void store(scalar* p, vf v) {
    vu u = float_to_bits(v);
    vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    vu quiet = (u >> 16) | 0x40u;  // NaN stays NaN (quiet), never rounds into inf
    vu out = v != v ? quiet : rounded;
    vh h = __builtin_convertvector(out, vh);
    std::memcpy(p, &h, sizeof h);
  }
  static float to_float(scalar x) { uint32_t u = uint32_t(x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
// float16 by integer operations (GCC turns a vector conversion of _Float16 into one instruction per element).
template <> struct Io<F16> {
  typedef uint16_t scalar;
  static vf load(const scalar* p) {
    vh h; std::memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu);
    vu magnitude = (u & 0x7fffu) << 13;  // exponent and mantissa, in place below the float's
    // Rebias the exponent by a product (exact, subnormal halves included); inf and NaN keep all ones.
    vf value = bits_to_float(magnitude) * 0x1p112f;
    vu out = magnitude >= (0x7c00u << 13) ? (magnitude | 0x7f800000u) : float_to_bits(value);
    return bits_to_float(out | ((u & 0x8000u) << 16));
  }
  static void store(scalar* p, vf v) {
    vu u = float_to_bits(v);
    vu a = u & 0x7fffffffu;
    // Normal halves: rebias the exponent, round to nearest even at bit 13.
    vu normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // Subnormal halves (and zero): |v| + 0.5 puts the half's last place at the float's, rounding once.
    vu subnormal = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
    vu h = a < 0x38800000u ? subnormal : normal;
    h = a >= 0x477ff000u ? vu{} + 0x7c00u : h;  // from 65520 on: inf
    h = a > 0x7f800000u ? vu{} + 0x7e00u : h;   // NaN
    vh out = __builtin_convertvector(h | ((u >> 16) & 0x8000u), vh);
    std::memcpy(p, &out, sizeof out);
  }
  static float to_float(scalar x) { vh h = vh{} + x; vf v = load(reinterpret_cast<const scalar*>(&h)); return v[0]; }
};

// The first n (< L) elements at p, the rest `fill`; and their store.
template <int T> inline vf load_part(const typename Io<T>::scalar* p, int64_t n, float fill) {
  float tmp[L];
  for (int i = 0; i < L; ++i) tmp[i] = i < n ? Io<T>::to_float(p[i]) : fill;
  vf v; std::memcpy(&v, tmp, sizeof v); return v;
}
template <int T> inline void store_part(typename Io<T>::scalar* p, int64_t n, vf v) {
  typename Io<T>::scalar tmp[L];
  Io<T>::store(tmp, v);
  std::memcpy(p, tmp, n * sizeof tmp[0]);
}

// n (any count) elements at p: a whole vector, or the first n and `fill`; and their store.
template <int T> inline vf load_n(const typename Io<T>::scalar* p, int64_t n, float fill) {
  return n >= L ? Io<T>::load(p) : load_part<T>(p, n, fill);
}
template <int T> inline void store_n(typename Io<T>::scalar* p, int64_t n, vf v) {
  if (n >= L) Io<T>::store(p, v); else store_part<T>(p, n, v);
}

inline bool any(vi m) { const vi none{}; return std::memcmp(&m, &none, sizeof m) != 0; }
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < L; ++i) m = v[i] > m ? v[i] : m; return m; }
inline float hsum(vf v) {  // pairwise across the lanes
  for (int w = L / 2; w >= 1; w /= 2) for (int i = 0; i < w; ++i) v[i] += v[i + w];
  return v[0];
}

// e^x: x = n ln 2 + r, |r| <= ln 2 / 2, e^r by its Taylor series to r^7 (truncation below 0.1 ulp),
// times 2^n as two powers of two, so that a subnormal result is rounded once. Below -104 it is 0,
// above 89 inf; NaN stays NaN.
inline vf vexp(vf x) {
  x = x < -104.0f ? splat(-104.0f) : x;
  x = x > 89.0f ? splat(89.0f) : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * 1.44269504088896341f + shifter) - shifter;
  n = n == n ? n : splat(0.0f);
  vf r = x - n * 0.693145751953125f;  // ln 2 in two parts: n * hi is exact
  r = r - n * 1.42860682030941723212e-6f;
  vf p = splat(1.0f / 5040);
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi ni = __builtin_convertvector(n, vi);
  vi half = ni >> 1;
  vf s1 = bits_to_float((vu)((half + 127) << 23));
  vf s2 = bits_to_float((vu)((ni - half + 127) << 23));
  return p * s1 * s2;
}

// tanh(u): below |u| = 0.8, u + u^3 P(u^2), P of degree 5 fitted to (tanh(u) - u) / u^3 (weighted least
// squares in float64, Lawson's iteration toward the least largest relative error: 0.06 ulp); above it
// 1 - 2 / (e^{2|u|} + 1), whose subtraction loses under half an ulp there. The sign of u; NaN stays NaN.
// Measured against float64: within 1.02 ulps (exp: 0.92); built without FMA (x86-64-v2), 1.10 (exp: 1.14).
inline vf vtanh(vf u) {
  vu sign = float_to_bits(u) & 0x80000000u;
  vf a = bits_to_float(float_to_bits(u) & 0x7fffffffu);
  a = a > 9.5f ? splat(9.5f) : a;  // tanh(9.5) rounds to 1
  vf a2 = a * a;
  vf p = splat(0.0015850412076662116f);
  p = p * a2 - 0.007410062712229206f;
  p = p * a2 + 0.021303322117317225f;
  p = p * a2 - 0.05385242920787858f;
  p = p * a2 + 0.13332222267807564f;
  p = p * a2 - 0.33333297408686124f;
  vf t = a + a * a2 * p;
  const vi large = a >= 0.8f;
  if (any(large)) t = large ? 1.0f - 2.0f / (vexp(a + a) + 1.0f) : t;  // (soft caps keep most |u| below 0.8)
  return bits_to_float(float_to_bits(t) | sign);
}

// 4K aliasing: a load that runs ahead of an earlier store to an address with the same low 12 bits waits
// for it, in every vector of a row when two streams sit at such offsets (measured: 1.7x on a row). A load
// stream at `load` meets a store stream at `store` so when it lies less than a kibibyte below it, modulo
// 4 KiB. The scratch rows are placed, per row, away from the rows they are read and written beside.
constexpr int64_t PLACES = 16;  // candidate offsets, 256 bytes apart: a scratch row holds V + PLACES * 64 floats
inline bool aliases(const void* load, const void* store) {
  return ((uintptr_t(load) - uintptr_t(store)) & 4095) >= 4096 - 1024;
}
inline float* place(float* base, const void* const* loads, int n_loads, const void* const* stores, int n_stores) {
  for (int64_t s = 0; s < PLACES; ++s) {
    float* p = base + s * 64;
    bool ok = true;
    for (int i = 0; i < n_loads; ++i) ok = ok && !(loads[i] && aliases(loads[i], p));
    for (int i = 0; i < n_stores; ++i) ok = ok && !(stores[i] && aliases(p, stores[i]));
    if (ok) return p;
  }
  return base;
}

struct Args {
  const void* x;          // (rows, V) logits, unit column stride
  int64_t x_stride;       // elements between rows
  void* g;                // (rows, V) gradient, unit column stride; null: no gradient
  int64_t g_stride;
  const int64_t* k;       // (rows,) targets in [0, V) (ignored rows on 0)
  const float* weight;    // (V,) class weights; null: all ones
  const float* coeff;     // the row factor's coeff, per row (coeff_stride 1) or one (0)
  int64_t coeff_stride;
  const float* z_coeff;   // 2 s w_k scale, per row or one; null: no z-loss
  int64_t z_coeff_stride;
  float* neg_max;         // (rows,) outputs: -m, e_k, q, S, and the smoothing sum (when smooth)
  float* e_k;
  float* rest;
  float* total;
  float* spread;
  float* scratch;         // 2 (V + PLACES * 64) floats: room for the t row and the e row
  int64_t rows;
  int64_t V;
  float cap;              // 0: no cap
  float column;           // the gradient's column term b_j = column w_j
  int32_t x_type;         // Type
  int32_t g_type;
  int32_t smooth;         // 1: the smoothing sum is wanted
};

// Pass 2 over the columns [lo, hi) (the target's column apart): the smoothing sum and q, e_j kept in `e`
// (null: not kept).
template <int X, bool CAP>
inline void exp_range(const Args& a, const typename Io<X>::scalar* x, const float* t, float m, float* e,
                      int64_t lo, int64_t hi, vf& spread, vf& rest) {
  const float cap = a.cap;
  for (int64_t c0 = lo; c0 < hi; c0 += CHUNK) {
    const int64_t c1 = c0 + CHUNK < hi ? c0 + CHUNK : hi;
    vf s = splat(0.0f), q = splat(0.0f);
    for (int64_t j = c0; j < c1; j += L) {
      const int64_t n = c1 - j;
      vf d;
      if (CAP) {
        d = load_n<F32>(t + j, n, 0.0f) * cap - m;
      } else {
        d = load_n<X>(x + j, n, 0.0f) - m;
      }
      const vi tail = n < L ? LANE < float(n) : vi{} - 1;  // the padding adds nothing to either sum
      vf ex = tail ? vexp(d) : splat(0.0f);
      if (a.smooth) {
        vf dd = tail ? d : splat(0.0f);
        s += a.weight ? load_n<F32>(a.weight + j, n, 0.0f) * dd : dd;
      }
      q += ex;
      if (e) store_n<F32>(e + j, n, ex);
    }
    spread += s;
    rest += q;
  }
}

template <int X, int G, bool CAP>
void rows_kernel(const Args& a) {
  typedef typename Io<X>::scalar xs;
  typedef typename Io<G>::scalar gs;
  const int64_t V = a.V;
  const float cap = a.cap;
  const int64_t room = V + PLACES * 64;
  for (int64_t r = 0; r < a.rows; ++r) {
    const xs* x = static_cast<const xs*>(a.x) + r * a.x_stride;
    gs* g = a.g ? static_cast<gs*>(a.g) + r * a.g_stride : nullptr;
    const int64_t k = a.k[r];
    // t: written beside x, read beside e and g; e: written beside t (or x) and the weights, read beside g.
    float* t = nullptr;
    float* e = nullptr;
    const bool e_in_g = g && G == F32;
    if (CAP) {
      const void* loads[] = {x};
      const void* stores[] = {g};
      t = place(a.scratch, loads, 1, stores, 1);
    }
    if (e_in_g) {
      e = reinterpret_cast<float*>(g);
    } else if (g) {
      const void* loads[] = {CAP ? static_cast<const void*>(t) : x, a.weight};
      const void* stores[] = {g};
      e = place(a.scratch + (CAP ? room : 0), loads, 2, stores, 1);
    }
    // Pass 1: t and the row max.
    vf mx = splat(-INFINITY);
    for (int64_t j = 0; j < V; j += L) {
      const int64_t n = V - j;
      vf v = load_n<X>(x + j, n, -INFINITY);
      if (CAP) {
        v = vtanh(v * (1.0f / cap));
        store_n<F32>(t + j, n, v);
        if (n < L) v = LANE < float(n) ? v : splat(-INFINITY);
      }
      mx = v > mx ? v : mx;
    }
    float m = hmax(mx);
    if (CAP) m *= cap;
    if (!std::isfinite(m)) m = 0.0f;  // a row of -inf (or NaN, +inf): the rest carries it
    // Pass 2: e, q and the smoothing sum; e_k apart.
    vf spread = splat(0.0f), rest = splat(0.0f);
    exp_range<X, CAP>(a, x, t, m, e, 0, k, spread, rest);
    exp_range<X, CAP>(a, x, t, m, e, k + 1, V, spread, rest);
    const float d_k = (CAP ? t[k] * cap : Io<X>::to_float(x[k])) - m;
    const float e_k = std::exp(d_k);
    const float q = hsum(rest), S = q + e_k;
    a.neg_max[r] = -m;
    a.e_k[r] = e_k;
    a.rest[r] = q;
    a.total[r] = S;
    if (a.smooth) a.spread[r] = hsum(spread) + (a.weight ? a.weight[k] * d_k : d_k);
    if (!g) continue;
    // Pass 3: the gradient, rounded once.
    float coeff = a.coeff[r * a.coeff_stride];
    if (a.z_coeff) coeff += a.z_coeff[r * a.z_coeff_stride] * (std::log(S) + m);
    const vf row = splat(coeff / S);
    const vf column = splat(a.column);
    for (int64_t j = 0; j < V; j += L) {
      const int64_t n = V - j;
      vf ex = load_n<F32>(e + j, n, 0.0f);
      vf b = a.weight ? load_n<F32>(a.weight + j, n, 0.0f) * column : column;
      vf out = row * ex + b;
      if (CAP) {
        vf tj = load_n<F32>(t + j, n, 0.0f);
        out = out * (1.0f - tj * tj);
      }
      store_n<G>(g + j, n, out);
    }
  }
}

template <int X, int G>
void by_cap(const Args& a) {
  if (a.cap != 0.0f) rows_kernel<X, G, true>(a); else rows_kernel<X, G, false>(a);
}

template <int X>
void by_grad(const Args& a) {
  switch (a.g ? a.g_type : F32) {
    case BF16: by_cap<X, BF16>(a); break;
    case F16: by_cap<X, F16>(a); break;
    default: by_cap<X, F32>(a);
  }
}

// smoothce_each's work.
template <int T> void each(int fn, const void* in, void* out, int64_t n) {
  typedef typename Io<T>::scalar ts;
  for (int64_t j = 0; j < n; j += L) {
    const int64_t m = n - j < L ? n - j : L;
    if (fn == 2) {
      store_n<F32>(static_cast<float*>(out) + j, m, load_n<T>(static_cast<const ts*>(in) + j, m, 0.0f));
      continue;
    }
    vf v = load_n<F32>(static_cast<const float*>(in) + j, m, 0.0f);
    if (fn == 3) { store_n<T>(static_cast<ts*>(out) + j, m, v); continue; }
    store_n<F32>(static_cast<float*>(out) + j, m, fn == 0 ? vtanh(v) : vexp(v));
  }
}
}  // namespace

extern "C" {

// The size of Args, which the caller checks against its own layout before the first call.
int64_t smoothce_args_size() { return sizeof(Args); }

// The kernel's own functions on n values, for the tests: fn 0 tanh, 1 exp (fp32 to fp32); 2 a load of
// `type` into fp32; 3 a store of fp32 into `type`.
void smoothce_each(int32_t fn, int32_t type, const void* in, void* out, int64_t n) {
  switch (type) {
    case BF16: each<BF16>(fn, in, out, n); break;
    case F16: each<F16>(fn, in, out, n); break;
    default: each<F32>(fn, in, out, n);
  }
}

void smoothce_recipe_rows(const Args* a) {
  switch (a->x_type) {
    case BF16: by_grad<BF16>(*a); break;
    case F16: by_grad<F16>(*a); break;
    default: by_grad<F32>(*a);
  }
}

}  // extern "C"
