// Weight-only int8 linear in groups of 32 along the input dimension, symmetric, float32 scales:
// y[b, n] = sum_k x[b, k] * (q[n, k] * scale[n, k / 32]). Used for the LM head of decode steps
// (layers/int8_group.py): GGUF's Q8_0 (int8 blocks of 32, one scale each) quantises back to this
// form exactly, and reading 1 byte a weight (plus 4 bytes of scale per 32) instead of bf16's 2 is
// what a few-row matmul against a [49152, 576] head is bound by.
//
// x [B, K] (float32, bfloat16 or float16; unit stride within a row) is converted to float32 once;
// output rows are split across threads. Each weight group is widened to float32 and multiplied by
// its scale (the reference's dequantised weight, bit for bit), then fed by FMA to every x row of a
// chunk of up to 8, so the weights are read from memory once for a batch of up to 8 rows (larger
// batches walk blocks of rows that stay in cache, chunk after chunk of x rows). Few x rows leave
// too few independent accumulators for the FMA latency, so several weight rows run together then.
// The result is float32 [B, N] whatever x's dtype: the caller (the LM head) wants float32 logits,
// and rounding them to bf16 would only lose precision.
//
// AVX-512 widens 16 int8 with vpmovsxbd + vcvtdq2ps; elsewhere the same loop is written with GCC /
// Clang vector extensions (two AVX2 registers per 16-float vector, or whatever the target has).
//
// Measured on 2 Sapphire Rapids cores, 2 threads, x bf16 [B, 576] against [49152, 576]: B=1 1.0 ms,
// B=4 1.5 ms (bf16 F.linear: 2.4-2.8 ms at any B <= 8; per-channel _weight_int8pack_mm: 1.1 / 1.8 ms).
// One row is bound by memory, four by the widening and FMAs.
//
// The schema and fake kernel live in cpu_extension.py; this file registers the CPU kernel.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define ARB_INLINE inline __attribute__((always_inline))

namespace {

constexpr int64_t GROUP = 32;
constexpr int MAX_B = 8;  // x rows sharing one pass over the weights
constexpr int PREFETCH = 2;  // software prefetch of the weight rows this many kernel steps ahead

typedef float vf __attribute__((vector_size(64)));
typedef int8_t vb __attribute__((vector_size(16)));

ARB_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ARB_INLINE vf vbcast(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

// 16 int8 weights as float32.
ARB_INLINE vf load_q16(const int8_t* p) {
#if defined(__AVX512F__)
  return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  vb v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, vf);
#endif
}

ARB_INLINE float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float s[16];
  std::memcpy(s, &v, sizeof s);
  float a = 0.f;
  for (int i = 0; i < 8; ++i) a += s[i] + s[i + 8];
  return a;
#endif
}

// Weight rows n .. n+R-1 against x rows 0 .. NB-1 (xf, row stride K): y[b * N + n + r].
template <int NB, int R>
ARB_INLINE void rows_kernel(const int8_t* q, const float* s, const float* xf, float* y, int64_t K, int64_t N,
                            int64_t n) {
  const int64_t G = K / GROUP;
  vf acc[R][NB][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[r][b][0] = acc[r][b][1] = vbcast(0.f);
  // the weight rows of a later step (measured: -10% single-threaded at one x row, -25% at four;
  // the hardware prefetcher alone leaves a core short of bandwidth). Prefetching past the end of
  // the weight is harmless (never faults); the address is formed as an integer.
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(q) + uintptr_t((n + R * PREFETCH) * K);
  for (int64_t o = 0; o < R * K; o += 64) __builtin_prefetch(reinterpret_cast<const void*>(ahead + o), 0, 3);
  for (int64_t g = 0; g < G; ++g) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int8_t* qp = q + (n + r) * K + g * GROUP;
      const vf sc = vbcast(s[(n + r) * G + g]);
      const vf w0 = load_q16(qp) * sc, w1 = load_q16(qp + 16) * sc;
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        const float* xp = xf + b * K + g * GROUP;
        acc[r][b][0] += w0 * vload(xp);
        acc[r][b][1] += w1 * vload(xp + 16);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) y[b * N + n + r] = hsum(acc[r][b][0] + acc[r][b][1]);
}

// Weight rows [n0, n1) against NB x rows: R rows at a time, then one at a time.
template <int NB>
void rows_range(const int8_t* q, const float* s, const float* xf, float* y, int64_t K, int64_t N, int64_t n0,
                int64_t n1) {
  // enough independent accumulators (R * NB * 2) to cover the FMA latency
  constexpr int R = NB == 1 ? 4 : (NB <= 4 ? 2 : 1);
  int64_t n = n0;
  for (; n + R <= n1; n += R) rows_kernel<NB, R>(q, s, xf, y, K, N, n);
  for (; n < n1; ++n) rows_kernel<NB, 1>(q, s, xf, y, K, N, n);
}

void rows_any(int nb, const int8_t* q, const float* s, const float* xf, float* y, int64_t K, int64_t N, int64_t n0,
              int64_t n1) {
  switch (nb) {
    case 1: return rows_range<1>(q, s, xf, y, K, N, n0, n1);
    case 2: return rows_range<2>(q, s, xf, y, K, N, n0, n1);
    case 3: return rows_range<3>(q, s, xf, y, K, N, n0, n1);
    case 4: return rows_range<4>(q, s, xf, y, K, N, n0, n1);
    case 5: return rows_range<5>(q, s, xf, y, K, N, n0, n1);
    case 6: return rows_range<6>(q, s, xf, y, K, N, n0, n1);
    case 7: return rows_range<7>(q, s, xf, y, K, N, n0, n1);
    default: return rows_range<8>(q, s, xf, y, K, N, n0, n1);
  }
}

inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const c10::Half* p, int64_t i) { return float(p[i]); }
inline float ld(const c10::BFloat16* p, int64_t i) {
  return __builtin_bit_cast(float, uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}

template <typename T>
void to_float(const at::Tensor& x, float* out) {
  const T* p = x.data_ptr<T>();
  const int64_t B = x.size(0), K = x.size(1), sx = x.stride(0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < K; ++k) out[b * K + k] = ld(p + b * sx, k);
}

at::Tensor int8_group_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2, "int8_group_linear: x must be 2-D [B, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "int8_group_linear: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "int8_group_linear: x's rows must be contiguous");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous(),
              "int8_group_linear: qweight must be a contiguous int8 [N, K] tensor, got ", qweight.scalar_type(), " ",
              qweight.sizes());
  const int64_t B = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == K, "int8_group_linear: x has K=", K, " input features but qweight is ",
              qweight.sizes());
  TORCH_CHECK(K % GROUP == 0, "int8_group_linear: K=", K, " is not a multiple of the group size ", GROUP);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kFloat && scales.is_contiguous() &&
                  scales.size(0) == N && scales.size(1) == K / GROUP,
              "int8_group_linear: scales must be a contiguous float32 [N, K/32] = [", N, ", ", K / GROUP,
              "] tensor, got ", scales.scalar_type(), " ", scales.sizes());
  at::Tensor y = at::empty({B, N}, x.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return y;
  if (K == 0) return y.zero_();

  std::vector<float> xf(B * K);
  switch (x.scalar_type()) {
    case at::kFloat: to_float<float>(x, xf.data()); break;
    case at::kBFloat16: to_float<c10::BFloat16>(x, xf.data()); break;
    default: to_float<c10::Half>(x, xf.data()); break;
  }
  const int8_t* qp = qweight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float* xp = xf.data();
  // A block of weight rows stays in L1/L2 while every chunk of MAX_B x rows passes over it.
  const int64_t block = std::max<int64_t>(16, (32 << 10) / K);
  at::parallel_for(0, N, std::max<int64_t>(16, (64 << 10) / K), [&](int64_t n0, int64_t n1) {
    for (int64_t nb = n0; nb < n1; nb += block) {
      const int64_t ne = std::min(n1, nb + block);
      for (int64_t b0 = 0; b0 < B; b0 += MAX_B)
        rows_any(int(std::min<int64_t>(MAX_B, B - b0)), qp, sp, xp + b0 * K, yp + b0 * N, K, N, nb, ne);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(arborlm, CPU, m) { m.impl("int8_group_linear", &int8_group_linear); }
