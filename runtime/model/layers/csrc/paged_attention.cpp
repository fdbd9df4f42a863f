// Paged attention for the CPU: decode and extend read K/V in place from the token-to-KV pool
// through the request-to-token table, so no per-step gather of the context is made.
//
// Layout: k_buffer/v_buffer [layers, slots, Hkv, D] (float32 or bfloat16), req_to_token [R, C]
// int64 (slot of each position of a request). Query head h reads kv head h / G (G = H / Hkv); the
// G query heads of one kv head are scored together, so each K/V row is loaded once per request,
// and a tile of slots is walked head after head, so the pool is read slot row by slot row.
// Few query rows per kv head (decode) score keys by dot products; many (a cascade prefix seen by
// the whole batch, an extend) score a transposed key tile, each key value feeding many rows.
//
// Softmax is online (flash-decoding): keys come in tiles of TILE, each query row keeps a running
// max m, sum l and output accumulator acc, all float32. Long key ranges are cut into chunks run by
// different threads, leaving partial (m, l, acc) states merged by their log-sum-exp. Scores are in
// base 2 (scaled by scale * log2 e) so exp is a cheap exp2.
//
// SIMD uses GCC/Clang vector extensions: with -march=native they become AVX-512 (or whatever the
// host has) and the source still builds elsewhere. Where the compiler targets AVX512-BF16, bf16
// keys are scored with vdpbf16ps straight from the pool (q split into two bf16 halves when it is
// float32, so the products stay float32-exact to ~2^-16).
//
// The ops' schemas and fake (meta) kernels are declared in paged_attention.py; this file only
// registers their CPU kernels, so a call is one C++ dispatch with no Python in between.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define ARBORLM_DPBF16 1
#else
#define ARBORLM_DPBF16 0
#endif

#define ARB_INLINE inline __attribute__((always_inline))

namespace {

constexpr int VL = 16;                    // floats per vector
constexpr int TILE = 32;                  // keys per tile: two score vectors per query row
constexpr int RB_MAX = 128;               // most query rows sharing one pass over a key tile
constexpr int MANY_ROWS = 24;             // from this many rows, transposing a key tile beats dot products
constexpr int64_t MIN_CHUNK = 128;        // keys: a thread's share of one sequence is never smaller
constexpr int64_t PARALLEL_WORK = 6000;   // row-keys below which one thread does it all
constexpr float LOG2E = 1.4426950408889634f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

// Constant two-input shuffle (indices into a ++ b): Clang and GCC >= 12 spell it one way, older GCC
// another.
#if defined(__clang__) || __GNUC__ >= 12
#define ARB_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define ARB_SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

ARB_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ARB_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
ARB_INLINE vf vbcast(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
ARB_INLINE vf vselect(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
ARB_INLINE vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
ARB_INLINE vi iota() { return vi{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}; }
ARB_INLINE float hsum(vf v) {
  v += ARB_SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += ARB_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += ARB_SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v += ARB_SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  return v[0];
}
ARB_INLINE float hmax(vf v) {
  v = vmax(v, ARB_SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));
  v = vmax(v, ARB_SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));
  v = vmax(v, ARB_SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));
  v = vmax(v, ARB_SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14));
  return v[0];
}

// 2^x for x <= 0, relative error ~2e-7; below 2^-125 it returns ~2^-125 (only ever added to sums
// that hold a term of weight 1; never a denormal). Round to nearest with the 1.5 * 2^23 trick, then
// a degree-6 Taylor polynomial of e^(f ln 2) for f in [-0.5, 0.5], scaled by 2^n in the exponent.
ARB_INLINE vf vexp2(vf x) {
  const float magic = 12582912.f;
  x = vmax(x, vbcast(-125.f));
  vf t = x + magic;
  vf f = x - (t - magic);
  vi e = ((vi)t - (vi)vbcast(magic)) << 23;
  vf p = vbcast(1.5403530393381606e-4f);
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.f;
  return (vf)((vi)p + e);
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
ARB_INLINE vf load16(const float* p) { return vload(p); }
ARB_INLINE vf load16(const c10::BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

// Sum each of 16 vectors into one lane (lane t = sum of a[t]) with 15 shuffle-add steps instead of
// 16 separate horizontal reductions.
ARB_INLINE vf fold8(vf a, vf b) {
  return ARB_SHUFFLE(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         ARB_SHUFFLE(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
ARB_INLINE vf fold4(vf a, vf b) {
  return ARB_SHUFFLE(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         ARB_SHUFFLE(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
ARB_INLINE vf fold2(vf a, vf b) {
  return ARB_SHUFFLE(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         ARB_SHUFFLE(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
ARB_INLINE vf fold1(vf a, vf b) {
  return ARB_SHUFFLE(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         ARB_SHUFFLE(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
ARB_INLINE vf tree16(const vf* a) {
  vf b[8], c[4];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) b[i] = fold8(a[2 * i], a[2 * i + 1]);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) c[i] = fold4(b[2 * i], b[2 * i + 1]);
  return fold1(fold2(c[0], c[1]), fold2(c[2], c[3]));
}

// Query rows of one kv head (row stride dp): float32 values, and for the vdpbf16ps path the same
// values as bf16 hi + lo halves (lo is null when q was bf16, i.e. hi is exact).
struct Queries {
  const float* f;
  const c10::BFloat16* hi;
  const c10::BFloat16* lo;
};

// Unscaled scores of one query row against 16 key rows (pointers K[0..15]): lane t = q . K[t].
// NV = D / 16 when known at compile time, 0 for a runtime loop.
template <typename E, int NV>
ARB_INLINE vf dot16(const float* q, const E* const* K, int nv_rt) {
  const int nv = NV ? NV : nv_rt;
  vf a[VL];
#pragma GCC unroll 16
  for (int t = 0; t < VL; ++t) {
    vf s = vload(q) * load16(K[t]);
    for (int v = 1; v < nv; ++v) s += vload(q + v * VL) * load16(K[t] + v * VL);
    a[t] = s;
  }
  return tree16(a);
}

#if ARBORLM_DPBF16
ARB_INLINE __m512bh load_bh(const void* p) { return (__m512bh)_mm512_loadu_si512(p); }
// The same with vdpbf16ps on raw bf16 keys: 32 products per instruction, no conversion.
template <int NC>
ARB_INLINE vf dot16_bf16(const c10::BFloat16* qhi, const c10::BFloat16* qlo, const c10::BFloat16* const* K, int nc_rt) {
  const int nc = NC ? NC : nc_rt;
  constexpr int NCM = NC ? NC : 8;
  __m512bh h[NCM], l[NCM];
  for (int c = 0; c < nc; ++c) {
    h[c] = load_bh(qhi + 32 * c);
    if (qlo) l[c] = load_bh(qlo + 32 * c);
  }
  vf a[VL];
#pragma GCC unroll 16
  for (int t = 0; t < VL; ++t) {
    __m512 s = _mm512_setzero_ps();
    for (int c = 0; c < nc; ++c) {
      __m512bh k = load_bh(K[t] + 32 * c);
      s = _mm512_dpbf16_ps(s, h[c], k);
      if (qlo) s = _mm512_dpbf16_ps(s, l[c], k);
    }
    a[t] = (vf)s;
  }
  return tree16(a);
}
#endif

#if ARBORLM_DPBF16
// Scores of RB query rows against bf16 keys packed as pairs, KP [D/2][TILE] (u32 = dims 2j, 2j+1
// of one key): one vdpbf16ps per row, pair and 16 keys, the query pair broadcast, no horizontal
// sums and no conversion of the keys. S rows get scores * sc.
template <int RB>
ARB_INLINE void scores_packed_bf16(const c10::BFloat16* qhi, const c10::BFloat16* qlo, int dp, int D,
                                   const uint32_t* KP, float sc, float* S) {
  __m512 s[RB][2];
  for (int r = 0; r < RB; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
  for (int j = 0; j < D / 2; ++j) {
    __m512bh k0 = load_bh(KP + j * TILE), k1 = load_bh(KP + j * TILE + VL);
    for (int r = 0; r < RB; ++r) {
      uint32_t pair;
      std::memcpy(&pair, qhi + (int64_t)r * dp + 2 * j, 4);
      __m512bh qp = (__m512bh)_mm512_set1_epi32((int)pair);
      s[r][0] = _mm512_dpbf16_ps(s[r][0], qp, k0);
      s[r][1] = _mm512_dpbf16_ps(s[r][1], qp, k1);
      if (qlo) {
        std::memcpy(&pair, qlo + (int64_t)r * dp + 2 * j, 4);
        qp = (__m512bh)_mm512_set1_epi32((int)pair);
        s[r][0] = _mm512_dpbf16_ps(s[r][0], qp, k0);
        s[r][1] = _mm512_dpbf16_ps(s[r][1], qp, k1);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    vstore(S + r * TILE, (vf)s[r][0] * sc);
    vstore(S + r * TILE + VL, (vf)s[r][1] * sc);
  }
}
#endif

// The same in float32 against a transposed key tile KT [D][TILE]: each key value is multiplied into
// RB rows from a register.
template <int RB>
ARB_INLINE void scores_transposed(const float* Q, int dp, int D, const float* KT, float sc, float* S) {
  vf s[RB][2];
  for (int r = 0; r < RB; ++r) s[r][0] = s[r][1] = vf{};
  for (int d = 0; d < D; ++d) {
    vf k0 = vload(KT + d * TILE), k1 = vload(KT + d * TILE + VL);
    for (int r = 0; r < RB; ++r) {
      vf qd = vbcast(Q[(int64_t)r * dp + d]);
      s[r][0] += qd * k0;
      s[r][1] += qd * k1;
    }
  }
  for (int r = 0; r < RB; ++r) {
    vstore(S + r * TILE, s[r][0] * sc);
    vstore(S + r * TILE + VL, s[r][1] * sc);
  }
}

// bf16 values are accumulated with even and odd elements of each 32 in separate vectors (see
// pv_rows); `unpermute` restores the natural order once a state is complete.
template <typename E, int NV>
constexpr bool interleaved() {
  return std::is_same_v<E, c10::BFloat16> && NV != 0 && NV % 2 == 0;
}
inline void unpermute(float* acc, int64_t rows, int dp) {
  float tmp[2 * VL];
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < dp; c += 2 * VL) {
      float* a = acc + r * dp + c;
      for (int i = 0; i < VL; ++i) {
        tmp[2 * i] = a[i];
        tmp[2 * i + 1] = a[VL + i];
      }
      std::memcpy(a, tmp, sizeof tmp);
    }
}

// acc[r] = acc[r] * alpha[r] + sum_t P[r][t] * V[t] for RB rows, accumulators held in registers.
template <typename E, int NV, int RB>
ARB_INLINE void pv_rows(float* acc, int dp, const float* alpha, const float* P, const E* const* V, int n) {
  if constexpr (NV == 0) {
    for (int r = 0; r < RB; ++r) {
      float* a = acc + (int64_t)r * dp;
      for (int j = 0; j < dp; j += VL) vstore(a + j, vload(a + j) * alpha[r]);
      for (int t = 0; t < n; ++t) {
        vf p = vbcast(P[r * TILE + t]);
        for (int j = 0; j < dp; j += VL) vstore(a + j, vload(a + j) + p * load16(V[t] + j));
      }
    }
  } else {
    vf a[RB][NV];
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) a[r][v] = vload(acc + (int64_t)r * dp + v * VL) * alpha[r];
    for (int t = 0; t < n; ++t) {
      vf x[NV];
      if constexpr (interleaved<E, NV>()) {
        // 32 bf16 as 16 u32: the low halves are the even elements, the high halves the odd ones;
        // each becomes a float vector with one shift or mask (no cross-lane widening).
        for (int c = 0; c < NV / 2; ++c) {
          vu u;
          std::memcpy(&u, V[t] + c * 2 * VL, sizeof u);
          x[2 * c] = (vf)(u << 16);
          x[2 * c + 1] = (vf)(u & 0xFFFF0000u);
        }
      } else {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) x[v] = load16(V[t] + v * VL);
      }
      for (int r = 0; r < RB; ++r) {
        vf p = vbcast(P[r * TILE + t]);
        for (int v = 0; v < NV; ++v) a[r][v] += p * x[v];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) vstore(acc + (int64_t)r * dp + v * VL, a[r][v]);
  }
}

template <typename E, int NV>
ARB_INLINE void pv(float* acc, int dp, const float* alpha, const float* P, const E* const* V, int n, int rows) {
  constexpr int RB = NV == 0 ? 1 : (NV <= 4 ? 4 : 2);
  int r = 0;
  for (; r + RB <= rows; r += RB) pv_rows<E, NV, RB>(acc + (int64_t)r * dp, dp, alpha + r, P + r * TILE, V, n);
  switch (rows - r) {  // the rest in one block too: the V rows are loaded (converted) once per block
    case 3: if constexpr (RB > 3) pv_rows<E, NV, 3>(acc + (int64_t)r * dp, dp, alpha + r, P + r * TILE, V, n); break;
    case 2: if constexpr (RB > 2) pv_rows<E, NV, 2>(acc + (int64_t)r * dp, dp, alpha + r, P + r * TILE, V, n); break;
    case 1: if constexpr (RB > 1) pv_rows<E, NV, 1>(acc + (int64_t)r * dp, dp, alpha + r, P + r * TILE, V, n); break;
    default: break;
  }
}

// Uninitialised scratch of n floats (everything in it is written before it is read).
inline std::unique_ptr<float[]> scratch(int64_t n) { return std::unique_ptr<float[]>(new float[n]); }

// Per-thread scratch: key/value tiles (used when rows cannot be read in place or must be
// transposed), scores, and the online-softmax states of an item's rows.

struct Work {
  int dp;
  std::unique_ptr<float[]> buf;
  float *K, *KT, *V, *S, *alpha, *m, *l, *acc;
  Work(int dp_, int64_t state_rows) : dp(dp_) {
    const int64_t tile = TILE * dp_;
    buf = scratch(3 * tile + RB_MAX * TILE + RB_MAX + state_rows * (dp_ + 2));
    K = buf.get();
    KT = K + tile;
    V = KT + tile;
    S = V + tile;
    alpha = S + RB_MAX * TILE;
    m = alpha + RB_MAX;
    l = m + state_rows;
    acc = l + state_rows;
  }
};

// Where a layer's K/V lives: base pointers (layer applied) and the slot and head strides.
template <typename T>
struct KV {
  const T* k;
  const T* v;
  int64_t slot_stride, head_stride, num_heads, num_slots;
};

// Convert n rows (pointers) to float32 rows of dp, zero padded, zero rows up to TILE.
template <typename T>
void load_tile(float* dst, const T* const* rows, int n, int D, int dp) {
  for (int t = 0; t < n; ++t) {
    float* d = dst + (int64_t)t * dp;
    int j = 0;
    for (; j + VL <= D; j += VL) vstore(d + j, load16(rows[t] + j));
    for (; j < D; ++j) d[j] = to_float(rows[t][j]);
    for (; j < dp; ++j) d[j] = 0.f;
  }
  if (n < TILE) std::memset(dst + (int64_t)n * dp, 0, sizeof(float) * (TILE - n) * dp);
}

// One tile of keys (row pointers kp/vp, n valid) for rows [0, rows) of the state: scores,
// online-softmax update, P V. `pos` is the tile's first position (for the causal limits).
template <typename E, int NV>
void tile_step(const Queries& q, int rows, const int64_t* limit, int64_t pos, float* m, float* l, float* acc,
               const E* const* kp, const E* const* vp, int n, int D, float sc, bool use_dp, Work& w) {
  const int dp = w.dp;
  float* S = w.S;
  bool scored = false;
#if ARBORLM_DPBF16
  if constexpr (std::is_same_v<E, c10::BFloat16>) {
    if (rows >= MANY_ROWS && use_dp) {
      uint32_t* KP = reinterpret_cast<uint32_t*>(w.KT);
      for (int t = 0; t < n; ++t) {
        const uint32_t* src = reinterpret_cast<const uint32_t*>(kp[t]);
        for (int j = 0; j < D / 2; ++j) KP[j * TILE + t] = src[j];
      }
      for (int t = n; t < TILE; ++t)
        for (int j = 0; j < D / 2; ++j) KP[j * TILE + t] = 0;
      const c10::BFloat16* lo = q.lo;
      int r = 0;
      for (; r + 8 <= rows; r += 8)
        scores_packed_bf16<8>(q.hi + (int64_t)r * dp, lo ? lo + (int64_t)r * dp : nullptr, dp, D, KP, sc, S + r * TILE);
      for (; r < rows; ++r)
        scores_packed_bf16<1>(q.hi + (int64_t)r * dp, lo ? lo + (int64_t)r * dp : nullptr, dp, D, KP, sc, S + r * TILE);
      scored = true;
    }
  }
#endif
  if (scored) {
  } else if (rows >= MANY_ROWS) {
    float* KT = w.KT;
    for (int t = 0; t < n; ++t)
      for (int d = 0; d < D; ++d) KT[d * TILE + t] = to_float(kp[t][d]);
    for (int t = n; t < TILE; ++t)
      for (int d = 0; d < D; ++d) KT[d * TILE + t] = 0.f;
    int r = 0;
    for (; r + 4 <= rows; r += 4) scores_transposed<4>(q.f + (int64_t)r * dp, dp, D, KT, sc, S + r * TILE);
    for (; r < rows; ++r) scores_transposed<1>(q.f + (int64_t)r * dp, dp, D, KT, sc, S + r * TILE);
  } else {
    for (int r = 0; r < rows; ++r) {
      for (int half = 0; half < 2; ++half) {
        vf s = vf{};
        if (half == 0 || n > VL) {
#if ARBORLM_DPBF16
          if constexpr (std::is_same_v<E, c10::BFloat16>) {
            if (use_dp) {
              const c10::BFloat16* lo = q.lo ? q.lo + (int64_t)r * dp : nullptr;
              s = NV == 4 ? dot16_bf16<2>(q.hi + (int64_t)r * dp, lo, kp + half * VL, 2)
                          : dot16_bf16<0>(q.hi + (int64_t)r * dp, lo, kp + half * VL, D / 32);
            } else {
              s = dot16<E, NV>(q.f + (int64_t)r * dp, kp + half * VL, dp / VL);
            }
          } else
#endif
            s = dot16<E, NV>(q.f + (int64_t)r * dp, kp + half * VL, dp / VL);
        }
        vstore(S + r * TILE + half * VL, s * sc);
      }
    }
  }
  // Online softmax: scores become probabilities in place; alpha rescales the old state.
  for (int r = 0; r < rows; ++r) {
    int valid = n;
    if (limit) valid = (int)std::min<int64_t>(n, limit[r] - pos);
    vi m0 = iota() < valid, m1 = (iota() + VL) < valid;
    vf s0 = vload(S + r * TILE), s1 = vload(S + r * TILE + VL);
    float mt = hmax(vmax(vselect(m0, s0, vbcast(NEG_INF)), vselect(m1, s1, vbcast(NEG_INF))));
    float m_new = std::max(m[r], mt);
    float alpha = m[r] == m_new ? 1.f : std::exp2(m[r] - m_new);
    vf p0 = vselect(m0, vexp2(s0 - m_new), vf{}), p1 = vselect(m1, vexp2(s1 - m_new), vf{});
    l[r] = l[r] * alpha + hsum(p0 + p1);
    m[r] = m_new;
    w.alpha[r] = alpha;
    vstore(S + r * TILE, p0);
    vstore(S + r * TILE + VL, p1);
  }
  pv<E, NV>(acc, dp, w.alpha, S, vp, n, rows);
}

// Attend R query rows per kv head, for all the pool's kv heads, to the keys at positions [k0, k1)
// whose slots are slots[pos], updating the online-softmax states m, l [Hkv][R] and acc [Hkv][R][dp].
// Head h's query rows start q_head_rows rows after head h-1's. The heads of a tile are walked one
// after the other, so the pool is read slot row by slot row (sequential when slots are) rather
// than in Hkv strided passes. With `limit`, row r sees only positions < limit[r] (causal extend);
// limits must not decrease with r.
template <typename T, int NV>
void attend(Queries q, int64_t q_head_rows, int R, const int64_t* limit, float* m, float* l, float* acc,
            const int64_t* slots, int64_t k0, int64_t k1, const KV<T>& kv, int D, float sc, Work& w) {
  const int dp = w.dp;
  const bool direct = D % VL == 0;  // rows can be read in place (no tail past the head's D values)
  const bool use_dp = ARBORLM_DPBF16 && std::is_same_v<T, c10::BFloat16> && D % 32 == 0 && D <= 256 && q.hi;
  const int64_t row_bytes = ((kv.num_heads - 1) * kv.head_stride + D) * (int64_t)sizeof(T);
  int64_t off[TILE];
  const T* kp[TILE];
  const T* vp[TILE];
  const float* kf[TILE];
  const float* vf_[TILE];
  int r0 = 0;
  for (int64_t pos = k0; pos < k1; pos += TILE) {
    if (limit)
      while (r0 < R && limit[r0] <= pos) ++r0;
    if (r0 == R) break;
    const int n = (int)std::min<int64_t>(TILE, k1 - pos);
    for (int t = 0; t < TILE; ++t) {
      const int64_t s = slots[pos + std::min(t, n - 1)];  // past n: repeat the last row (masked)
      TORCH_CHECK(s >= 0 && s < kv.num_slots, "paged attention: KV slot ", s, " out of range [0, ", kv.num_slots, ")");
      off[t] = s * kv.slot_stride;
    }
    const int nn = (int)std::min<int64_t>(TILE, k1 - pos - TILE);
    if (nn > 0) {
      // Fetch the next tile's rows (all heads) ahead: slots may be scattered, and even a contiguous
      // run is short enough per request that the hardware prefetcher's ramp-up shows (~20% at B=32).
      for (int t = 0; t < nn; ++t) {
        const int64_t s = slots[pos + TILE + t];
        if (s < 0 || s >= kv.num_slots) continue;
        const char* a = (const char*)(kv.k + s * kv.slot_stride);
        const char* b = (const char*)(kv.v + s * kv.slot_stride);
        for (int64_t o = 0; o < row_bytes; o += 64) {
          __builtin_prefetch(a + o);
          __builtin_prefetch(b + o);
        }
      }
    }
    const int rows = R - r0;
    const int64_t* lim = limit ? limit + r0 : nullptr;
    for (int64_t h = 0; h < kv.num_heads; ++h) {
      const int64_t qr0 = h * q_head_rows + r0;
      Queries qh{q.f + qr0 * dp, q.hi ? q.hi + qr0 * dp : nullptr, q.lo ? q.lo + qr0 * dp : nullptr};
      const int64_t sr0 = h * R + r0;
      float *mh = m + sr0, *lh = l + sr0, *ah = acc + sr0 * dp;
      const T* kh = kv.k + h * kv.head_stride;
      const T* vh = kv.v + h * kv.head_stride;
      for (int t = 0; t < TILE; ++t) {
        kp[t] = kh + off[t];
        vp[t] = vh + off[t];
      }
      if (direct) {
        tile_step<T, NV>(qh, rows, lim, pos, mh, lh, ah, kp, vp, n, D, sc, use_dp, w);
      } else {
        load_tile(w.K, kp, n, D, dp);
        load_tile(w.V, vp, n, D, dp);
        for (int t = 0; t < TILE; ++t) {
          kf[t] = w.K + (int64_t)std::min(t, n - 1) * dp;
          vf_[t] = w.V + (int64_t)std::min(t, n - 1) * dp;
        }
        tile_step<float, NV>(qh, rows, lim, pos, mh, lh, ah, kf, vf_, n, dp, sc, false, w);
      }
    }
  }
  if (interleaved<T, NV>() && direct) unpermute(acc, kv.num_heads * R, dp);
}

inline void init_state(float* m, float* l, float* acc, int R, int dp) {
  std::fill(m, m + R, NEG_INF);
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + (int64_t)R * dp, 0.f);
}

// out[d] = acc / l in the output dtype; a row that saw no key gets zeros.
template <typename O>
inline void write_row(O* out, const float* acc, float l, int D) {
  const float inv = l > 0.f ? 1.f / l : 0.f;
  for (int d = 0; d < D; ++d) out[d] = static_cast<O>(acc[d] * inv);
}

// A partial state (m, l, acc) as stored between the two passes: row of dp + 2 floats.
struct Partial {
  float m, l;
  const float* acc;
};
inline void store_partial(float* s, const float* acc, float m, float l, int dp) {
  std::memcpy(s, acc, sizeof(float) * dp);
  s[dp] = m;
  s[dp + 1] = l;
}

// Merge partial states of one row by their log-sum-exp and write it.
template <typename O>
void merge_row(O* out, const Partial* parts, int n, int D, float* tmp) {
  float M = NEG_INF;
  for (int i = 0; i < n; ++i) M = std::max(M, parts[i].m);
  std::fill(tmp, tmp + D, 0.f);
  float L = 0.f;
  if (M != NEG_INF) {
    for (int i = 0; i < n; ++i) {
      if (parts[i].l == 0.f) continue;
      const float wgt = std::exp2(parts[i].m - M);
      L += parts[i].l * wgt;
      for (int d = 0; d < D; ++d) tmp[d] += parts[i].acc[d] * wgt;
    }
  }
  write_row(out, tmp, L, D);
}

// Run n_items on up to torch's thread count, handing items out dynamically (their costs differ).
template <typename F>
void run_items(int64_t n_items, int64_t work, int dp, int64_t state_rows, const F& fn) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n_items);
  if (nt <= 1 || work < PARALLEL_WORK || at::in_parallel_region()) {
    Work w(dp, state_rows);
    for (int64_t i = 0; i < n_items; ++i) fn(i, w);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    Work w(dp, state_rows);
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) fn(i, w);
  });
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dispatch on the pool dtype and on NV (vectors per padded head row) so hot loops are unrolled.
template <typename F>
void dispatch_kv(const at::Tensor& kb, int dp, const F& f) {
  auto with_nv = [&](auto tag) {
    switch (dp / VL) {
      case 1: f(tag, std::integral_constant<int, 1>{}); break;
      case 2: f(tag, std::integral_constant<int, 2>{}); break;
      case 4: f(tag, std::integral_constant<int, 4>{}); break;
      case 8: f(tag, std::integral_constant<int, 8>{}); break;
      default: f(tag, std::integral_constant<int, 0>{}); break;
    }
  };
  if (kb.scalar_type() == at::kFloat) with_nv(float{});
  else with_nv(c10::BFloat16{});
}

void check_pool(const at::Tensor& kb, const at::Tensor& vb, int64_t layer) {
  TORCH_CHECK(kb.device().is_cpu() && vb.device().is_cpu(), "paged attention: the KV pool must be on the CPU");
  TORCH_CHECK(kb.dim() == 4 && vb.sizes() == kb.sizes(), "paged attention: k/v buffers must be [L, S, Hkv, D] alike");
  TORCH_CHECK(kb.scalar_type() == vb.scalar_type(), "paged attention: k/v buffers differ in dtype");
  TORCH_CHECK(kb.scalar_type() == at::kFloat || kb.scalar_type() == at::kBFloat16,
              "paged attention: KV dtype must be float32 or bfloat16, got ", kb.scalar_type());
  TORCH_CHECK(kb.stride(3) == 1 && vb.stride(3) == 1 && kb.strides() == vb.strides(),
              "paged attention: k/v buffers need a contiguous last dim and equal strides");
  TORCH_CHECK(layer >= 0 && layer < kb.size(0), "paged attention: layer ", layer, " out of range");
}

at::Tensor long_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "paged attention: ", what, " must be 1-D of length ", n);
  TORCH_CHECK(t.scalar_type() == at::kLong && t.device().is_cpu(), "paged attention: ", what, " must be int64 on CPU");
  return t.is_contiguous() ? t : t.contiguous();
}

// q [n, H, D] (any strides) -> query rows in kv-head-major order [Hkv][n][G], each padded to dp:
// float32 values and, when `split` (bf16 pool on a CPU with vdpbf16ps), the bf16 hi/lo halves.
struct QueryRows {
  std::unique_ptr<float[]> f;
  std::unique_ptr<c10::BFloat16[]> hi, lo;
  Queries rows_at(int64_t row, int dp) const {
    return {f.get() + row * dp, hi ? hi.get() + row * dp : nullptr, lo ? lo.get() + row * dp : nullptr};
  }
};
QueryRows query_rows(const at::Tensor& q, int64_t Hkv, int dp, bool split) {
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), G = H / Hkv;
  QueryRows out;
  out.f = scratch(n * H * dp);
  const bool q_bf16 = q.scalar_type() == at::kBFloat16;
  if (split) {
    out.hi.reset(new c10::BFloat16[n * H * dp]);
    if (!q_bf16) out.lo.reset(new c10::BFloat16[n * H * dp]);
  }
  float* f = out.f.get();
  c10::BFloat16* hi = out.hi.get();
  c10::BFloat16* lo = out.lo.get();
  const int64_t s0 = q.stride(0), s1 = q.stride(1), s2 = q.stride(2);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_attention_queries", [&] {
    const scalar_t* qp = q.data_ptr<scalar_t>();
    for (int64_t t = 0; t < n; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* src = qp + t * s0 + h * s1;
        const int64_t row = ((h / G) * n + t) * G + h % G;
        float* dst = f + row * dp;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d * s2]);
        for (int64_t d = D; d < dp; ++d) dst[d] = 0.f;
        if (hi)
          for (int64_t d = 0; d < dp; ++d) hi[row * dp + d] = c10::BFloat16(dst[d]);
        if (lo)
          for (int64_t d = 0; d < dp; ++d) lo[row * dp + d] = c10::BFloat16(dst[d] - static_cast<float>(hi[row * dp + d]));
      }
  });
  return out;
}

bool want_split(const at::Tensor& kb, int64_t D) {
  return ARBORLM_DPBF16 && kb.scalar_type() == at::kBFloat16 && D % 32 == 0 && D <= 256;
}

template <typename T>
KV<T> layer_kv(const at::Tensor& kb, const at::Tensor& vb, int64_t layer) {
  return KV<T>{kb.data_ptr<T>() + layer * kb.stride(0), vb.data_ptr<T>() + layer * vb.stride(0), kb.stride(1),
               kb.stride(2), kb.size(2), kb.size(1)};
}

// Decode attention: request b (query q[b]) attends to the slots table[rows[b], 0:lens[b]]. With
// prefix_len P > 0 those first P slots are the same for every request (one shared cached prefix):
// they are scored once per kv head for all B*G query rows together and merged with each request's
// own suffix (cascade attention).
//
// Work items: (request, chunk of its own keys) and (prefix chunk, block of query rows), each over
// all kv heads. Chunks are sized for ~4 items per thread, so batch 1 still uses every thread and
// ragged batches balance; the partial states of a split row are merged in a second pass.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_buffer, const at::Tensor& v_buffer, int64_t layer,
                            const at::Tensor& req_to_token, const at::Tensor& req_rows, const at::Tensor& seq_lens,
                            const at::Tensor& prefix_len, double scale) {
  check_pool(k_buffer, v_buffer, layer);
  TORCH_CHECK(q.dim() == 3 && q.device().is_cpu(), "decode_attention: q must be [B, H, D] on the CPU");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_buffer.size(2);
  TORCH_CHECK(k_buffer.size(3) == D && H % Hkv == 0, "decode_attention: q heads/dim do not fit the pool");
  const int64_t G = H / Hkv;
  TORCH_CHECK(G <= RB_MAX, "decode_attention: more than ", RB_MAX, " query heads per kv head");
  TORCH_CHECK(req_to_token.dim() == 2 && req_to_token.scalar_type() == at::kLong, "decode_attention: bad req_to_token");
  TORCH_CHECK(prefix_len.numel() == 1, "decode_attention: prefix_len must be a scalar tensor");
  at::Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0) return out;
  const at::Tensor table = req_to_token.stride(1) == 1 ? req_to_token : req_to_token.contiguous();
  const at::Tensor rows_t = long_vector(req_rows, B, "req_rows"), lens_t = long_vector(seq_lens, B, "seq_lens");
  const int64_t* rows = rows_t.data_ptr<int64_t>();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  const int64_t P = prefix_len.scalar_type() == at::kLong && prefix_len.device().is_cpu()
                        ? *prefix_len.data_ptr<int64_t>()  // no dispatch: this runs every layer of every step
                        : prefix_len.item<int64_t>();
  const int64_t C = table.size(1);
  TORCH_CHECK(P >= 0, "decode_attention: negative prefix_len");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(rows[b] >= 0 && rows[b] < table.size(0), "decode_attention: request row ", rows[b], " out of range");
    TORCH_CHECK(lens[b] >= P && lens[b] <= C, "decode_attention: seq_len ", lens[b], " outside [prefix_len, ", C, "]");
  }
  const int dp = (int)round_up(D, VL);
  const QueryRows Q = query_rows(q, Hkv, dp, want_split(k_buffer, D));  // [Hkv][B][G][dp]
  const float sc = (float)(scale * LOG2E);
  const int64_t BG = B * G;

  const int64_t nt = at::get_num_threads();
  int64_t own_keys = 0;
  for (int64_t b = 0; b < B; ++b) own_keys += lens[b] - P;
  const int64_t work = H * (own_keys + B * P);  // row-keys
  const int64_t per_item = std::max<int64_t>(1, work / (4 * nt));
  const int64_t chunk = round_up(std::max(MIN_CHUNK, cdiv(per_item, H)), TILE);
  std::vector<int64_t> splits(B), first(B + 1, 0);
  bool single = P == 0;
  for (int64_t b = 0; b < B; ++b) {
    splits[b] = std::max<int64_t>(1, cdiv(lens[b] - P, chunk));
    first[b + 1] = first[b] + splits[b];
    single = single && splits[b] == 1;
  }
  const int64_t n_rb = cdiv(BG, RB_MAX), rb_rows = cdiv(BG, n_rb);
  const int64_t p_chunk = P ? round_up(std::max(MIN_CHUNK / 2, cdiv(per_item, rb_rows * Hkv)), TILE) : 1;
  const int64_t p_splits = P ? cdiv(P, p_chunk) : 0;

  const int64_t st = dp + 2;  // partial state row: acc[dp], m, l
  std::unique_ptr<float[]> own_st, pre_st;  // own partials [first[B]][Hkv][G], prefix ones [Hkv][p_splits][BG]
  if (!single) own_st = scratch(first[B] * Hkv * G * st);
  if (P) pre_st = scratch(Hkv * p_splits * BG * st);
  float *own = own_st.get(), *pre = pre_st.get();
  const int64_t n_own = first[B], n_pre = p_splits * n_rb;
  const int64_t out_sb = out.stride(0), out_sh = out.stride(1);
  const int64_t* tab = table.data_ptr<int64_t>();
  const int64_t tab_stride = table.stride(0);

  dispatch_kv(k_buffer, dp, [&](auto kv_tag, auto nv_tag) {
    using T = decltype(kv_tag);
    constexpr int NV = decltype(nv_tag)::value;
    const KV<T> kv = layer_kv<T>(k_buffer, v_buffer, layer);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "decode_attention_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      run_items(n_pre + n_own, work, dp, Hkv * std::max(G, std::min(BG, rb_rows)), [&](int64_t i, Work& w) {
        float *m = w.m, *l = w.l, *acc = w.acc;
        if (i < n_pre) {  // shared prefix: chunk j, row block rb; all requests at once
          const int64_t rb = i % n_rb, j = i / n_rb;
          const int64_t r_lo = rb * rb_rows, R = std::min(BG, r_lo + rb_rows) - r_lo;
          init_state(m, l, acc, (int)(Hkv * R), dp);
          attend<T, NV>(Q.rows_at(r_lo, dp), BG, (int)R, nullptr, m, l, acc, tab + rows[0] * tab_stride, j * p_chunk,
                        std::min(P, (j + 1) * p_chunk), kv, (int)D, sc, w);
          for (int64_t h = 0; h < Hkv; ++h)
            for (int64_t r = 0; r < R; ++r)
              store_partial(pre + ((h * p_splits + j) * BG + r_lo + r) * st, acc + (h * R + r) * dp, m[h * R + r],
                            l[h * R + r], dp);
          return;
        }
        i -= n_pre;  // own suffix: request b, its split j
        const int64_t b = std::upper_bound(first.begin(), first.end(), i) - first.begin() - 1, j = i - first[b];
        const int64_t lo = P + j * chunk, hi = std::min(lens[b], lo + chunk);
        init_state(m, l, acc, (int)(Hkv * G), dp);
        attend<T, NV>(Q.rows_at(b * G, dp), BG, (int)G, nullptr, m, l, acc, tab + rows[b] * tab_stride, lo, hi, kv,
                      (int)D, sc, w);
        for (int64_t h = 0; h < Hkv; ++h)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t r = h * G + g;
            if (single) write_row(o + b * out_sb + r * out_sh, acc + r * dp, l[r], (int)D);
            else store_partial(own + ((first[b] + j) * H + r) * st, acc + r * dp, m[r], l[r], dp);
          }
      });
      if (single) return;
      run_items(B, work / 8, dp, 1, [&](int64_t b, Work& w) {
        std::vector<Partial> parts(splits[b] + p_splits);
        for (int64_t h = 0; h < Hkv; ++h)
          for (int64_t g = 0; g < G; ++g) {
            int n = 0;
            for (int64_t j = 0; j < splits[b]; ++j) {
              const float* s = own + ((first[b] + j) * H + h * G + g) * st;
              parts[n++] = {s[dp], s[dp + 1], s};
            }
            for (int64_t j = 0; j < p_splits; ++j) {
              const float* s = pre + ((h * p_splits + j) * BG + b * G + g) * st;
              parts[n++] = {s[dp], s[dp + 1], s};
            }
            merge_row(o + b * out_sb + (h * G + g) * out_sh, parts.data(), n, (int)D, w.acc);
          }
      });
    });
  });
  return out;
}

// Extend attention for one request: n new queries at positions P..P+n-1, causal over the slots
// table[row, 0:P+n] (all written already), read in place; the prefix is never gathered. Items are
// (key chunk, block of query rows) over all kv heads; rows past a chunk's causal reach skip it.
at::Tensor extend_attention(const at::Tensor& q, const at::Tensor& k_buffer, const at::Tensor& v_buffer, int64_t layer,
                            const at::Tensor& req_to_token, int64_t req_row, int64_t prefix_len, double scale) {
  check_pool(k_buffer, v_buffer, layer);
  TORCH_CHECK(q.dim() == 3 && q.device().is_cpu(), "extend_attention: q must be [n, H, D] on the CPU");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_buffer.size(2);
  TORCH_CHECK(k_buffer.size(3) == D && H % Hkv == 0, "extend_attention: q heads/dim do not fit the pool");
  TORCH_CHECK(req_to_token.dim() == 2 && req_to_token.scalar_type() == at::kLong, "extend_attention: bad req_to_token");
  TORCH_CHECK(req_row >= 0 && req_row < req_to_token.size(0), "extend_attention: request row out of range");
  TORCH_CHECK(prefix_len >= 0 && prefix_len + n <= req_to_token.size(1), "extend_attention: positions past the table");
  const int64_t G = H / Hkv, P = prefix_len, K = P + n, R = n * G;
  at::Tensor out = at::empty({n, H, D}, q.options());
  if (n == 0) return out;
  const at::Tensor row = req_to_token.select(0, req_row).contiguous();
  const int dp = (int)round_up(D, VL);
  const QueryRows Q = query_rows(q, Hkv, dp, want_split(k_buffer, D));  // [Hkv][n][G][dp]
  const float sc = (float)(scale * LOG2E);
  std::vector<int64_t> limit(R);
  for (int64_t r = 0; r < R; ++r) limit[r] = P + r / G + 1;

  const int64_t nt = at::get_num_threads();
  const int64_t work = H * (n * P + n * (n + 1) / 2);
  const int64_t n_rb = cdiv(R, RB_MAX), rb_rows = cdiv(R, n_rb);
  const int64_t want = cdiv(4 * nt, n_rb);
  const int64_t chunk = round_up(std::max(MIN_CHUNK, cdiv(K, want)), TILE);
  const int64_t splits = cdiv(K, chunk);
  const bool single = splits == 1;
  const int64_t st = dp + 2;
  std::unique_ptr<float[]> part;  // partials [Hkv][splits][R]
  if (!single) part = scratch(Hkv * splits * R * st);
  float* pst = part.get();
  const int64_t out_sn = out.stride(0), out_sh = out.stride(1);
  const int64_t* slots = row.data_ptr<int64_t>();

  dispatch_kv(k_buffer, dp, [&](auto kv_tag, auto nv_tag) {
    using T = decltype(kv_tag);
    constexpr int NV = decltype(nv_tag)::value;
    const KV<T> kv = layer_kv<T>(k_buffer, v_buffer, layer);
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "extend_attention_out", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      run_items(n_rb * splits, work, dp, Hkv * rb_rows, [&](int64_t i, Work& w) {
        const int64_t rb = i % n_rb, j = i / n_rb;
        const int64_t r_lo = rb * rb_rows, nr = std::min(R, r_lo + rb_rows) - r_lo;
        float *m = w.m, *l = w.l, *acc = w.acc;
        init_state(m, l, acc, (int)(Hkv * nr), dp);
        attend<T, NV>(Q.rows_at(r_lo, dp), R, (int)nr, limit.data() + r_lo, m, l, acc, slots, j * chunk,
                      std::min(K, (j + 1) * chunk), kv, (int)D, sc, w);
        for (int64_t h = 0; h < Hkv; ++h)
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t rr = r_lo + r, sr = h * nr + r;
            if (single) write_row(o + (rr / G) * out_sn + (h * G + rr % G) * out_sh, acc + sr * dp, l[sr], (int)D);
            else store_partial(pst + ((h * splits + j) * R + rr) * st, acc + sr * dp, m[sr], l[sr], dp);
          }
      });
      if (single) return;
      run_items(n, work / 8, dp, 1, [&](int64_t t, Work& w) {
        std::vector<Partial> parts(splits);
        for (int64_t h = 0; h < Hkv; ++h)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t rr = t * G + g;
            for (int64_t j = 0; j < splits; ++j) {
              const float* s = pst + ((h * splits + j) * R + rr) * st;
              parts[j] = {s[dp], s[dp + 1], s};
            }
            merge_row(o + t * out_sn + (h * G + g) * out_sh, parts.data(), (int)splits, (int)D, w.acc);
          }
      });
    });
  });
  return out;
}

// Write k/v [T, Hkv, D] into the pool at `slots`, in place (one row copy per token and head).
void kv_write(const at::Tensor& k_buffer, const at::Tensor& v_buffer, int64_t layer, const at::Tensor& slots,
              const at::Tensor& k, const at::Tensor& v) {
  check_pool(k_buffer, v_buffer, layer);
  const int64_t T = slots.numel(), Hkv = k_buffer.size(2), D = k_buffer.size(3);
  TORCH_CHECK(k.dim() == 3 && k.size(0) == T && k.size(1) == Hkv && k.size(2) == D && v.sizes() == k.sizes(),
              "kv_write: k/v must be [T, Hkv, D] matching the pool");
  TORCH_CHECK(k.scalar_type() == k_buffer.scalar_type() && v.scalar_type() == k_buffer.scalar_type(),
              "kv_write: k/v dtype differs from the pool");
  const at::Tensor s = long_vector(slots.reshape({-1}), T, "slots");
  const at::Tensor kc = k.stride(2) == 1 ? k : k.contiguous(), vc = v.stride(2) == 1 ? v : v.contiguous();
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t S = k_buffer.size(1), es = k_buffer.element_size();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < S, "kv_write: slot ", sp[t], " out of range");
  char* kb = (char*)k_buffer.data_ptr() + layer * k_buffer.stride(0) * es;
  char* vb = (char*)v_buffer.data_ptr() + layer * v_buffer.stride(0) * es;
  const char* kp = (const char*)kc.data_ptr();
  const char* vp = (const char*)vc.data_ptr();
  const int64_t ks1 = k_buffer.stride(1), ks2 = k_buffer.stride(2);
  at::parallel_for(0, T, 512, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t h = 0; h < Hkv; ++h) {
        std::memcpy(kb + (sp[t] * ks1 + h * ks2) * es, kp + (t * kc.stride(0) + h * kc.stride(1)) * es, D * es);
        std::memcpy(vb + (sp[t] * ks1 + h * ks2) * es, vp + (t * vc.stride(0) + h * vc.stride(1)) * es, D * es);
      }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(arborlm, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("extend_attention", &extend_attention);
  m.impl("kv_write", &kv_write);
}
