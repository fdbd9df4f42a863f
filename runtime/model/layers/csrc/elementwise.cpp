// The small per-token layers of a Llama block on the CPU, each one pass over its rows: RMSNorm with
// the residual add fused in, RoPE rotating q and k in place inside the qkv output, SiLU-and-mul.
//
// Eagerly, torch runs each of these as 3-7 separate ops (float casts, pow, mean, rsqrt, cat, ...),
// each streaming the whole [tokens, hidden] activation through memory: in a bf16 2048-token prefill
// they took ~40% of the time. They round where the unfused torch ops round (the residual sum, the
// normalised row and silu(gate) to the activation dtype before the product with the weight / up),
// so their outputs match the torch references up to float32 summation order and exp's last bit.
//
// Schemas and fake kernels live in fused_cpu.py; this file registers the CPU kernels. The same
// signatures as the Triton kernels in arborlm.kernels, whose plain-torch references test both.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

// Element access in float. bf16 goes through its bits (round to nearest even, NaN kept quiet) rather
// than c10::BFloat16's branchy conversions, so that GCC vectorises the loops below.
inline float ld(const float* p, int64_t i) { return p[i]; }
inline float ld(const c10::Half* p, int64_t i) { return float(p[i]); }
inline float ld(const c10::BFloat16* p, int64_t i) {
  return __builtin_bit_cast(float, uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16);
}
inline void st(float* p, int64_t i, float x) { p[i] = x; }
inline void st(c10::Half* p, int64_t i, float x) { p[i] = c10::Half(x); }
inline void st(c10::BFloat16* p, int64_t i, float x) {
  const uint32_t u = __builtin_bit_cast(uint32_t, x);
  const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  reinterpret_cast<uint16_t*>(p)[i] = uint16_t(x != x ? 0x7fc0u : r);
}
// x rounded to T's precision, as a float (what storing to T and loading back gives).
template <typename T>
inline float rnd(float x) {
  T tmp[1];
  st(tmp, 0, x);
  return ld(tmp, 0);
}

// e^x in float32, ~2 ulp (inf above 88.7, ~e^-87 below -87): round x / ln 2 to n, a degree-6
// polynomial of e^r on r = x - n ln 2 in [-ln2/2, ln2/2], scaled by 2^n through the exponent.
// Branch-free, so loops over it vectorise (std::exp does not).
inline float fast_exp(float x) {
  const float xc = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = (xc * 1.4426950408889634f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const float e = p * __builtin_bit_cast(float, uint32_t(int32_t(n) + 127) << 23);
  return x > 88.7f ? __builtin_inff() : e;
}

// f(T{}) for the activation dtypes these kernels take (float32, bfloat16, float16).
template <typename F>
void dispatch(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "arborlm CPU kernels: float32, bfloat16 or float16 only, got ", t);
  }
}

void check_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, op, ": expects a 2-D tensor with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              op, ": float32, bfloat16 or float16 only");
}

// y = weight * round(norm(x + residual)); returns (y, round(x + residual)) (r_out = y's storage-free
// alias of x when there is no residual: the caller ignores it).
std::tuple<at::Tensor, at::Tensor> rmsnorm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                           const c10::optional<at::Tensor>& residual) {
  check_rows(x, "rmsnorm");
  const int64_t T = x.size(0), N = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == N && weight.is_contiguous(), "rmsnorm: weight must be [N]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rmsnorm: weight dtype differs from x");
  const bool has_r = residual.has_value() && residual->defined();
  if (has_r) {
    check_rows(*residual, "rmsnorm");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "rmsnorm: residual must match x");
  }
  at::Tensor y = at::empty({T, N}, x.options());
  at::Tensor r_out = has_r ? at::empty({T, N}, x.options()) : x;
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = has_r ? residual->data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* op = has_r ? r_out.data_ptr<scalar_t>() : nullptr;
    const int64_t sx = x.stride(0), sr = has_r ? residual->stride(0) : 0;
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / N), [&](int64_t t0, int64_t t1) {
      std::vector<float> h(N);
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* xr = xp + t * sx;
        if (has_r) {
          const scalar_t* rr = rp + t * sr;
          scalar_t* orow = op + t * N;
          for (int64_t i = 0; i < N; ++i) {
            const float s = ld(xr, i) + ld(rr, i);
            st(orow, i, s);
            h[i] = rnd<scalar_t>(s);
          }
        } else {
          for (int64_t i = 0; i < N; ++i) h[i] = ld(xr, i);
        }
        float part[16] = {0.f};  // 16 running sums: a vector of them
        int64_t i = 0;
        for (; i + 16 <= N; i += 16)
          for (int j = 0; j < 16; ++j) part[j] += h[i + j] * h[i + j];
        for (; i < N; ++i) part[0] += h[i] * h[i];
        float ss = 0.f;
        for (int j = 0; j < 16; ++j) ss += part[j];
        const float inv = 1.f / std::sqrt(ss / float(N) + float(eps));
        scalar_t* yr = yp + t * N;
        for (int64_t i = 0; i < N; ++i) st(yr, i, ld(wp, i) * rnd<scalar_t>(h[i] * inv));
      }
    });
  });
  return {y, r_out};
}

// Rotate-half RoPE of q [T, H, D] and k [T, Hkv, D] (rows of any stride, unit stride within a head)
// in place, by the rows `positions` [T] of cos/sin [max_positions, D].
void rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
          const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rope: q [T, H, D] and k [T, Hkv, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1, "rope: heads must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == q.scalar_type() &&
                  sin.scalar_type() == q.scalar_type(), "rope: q, k, cos and sin must share a dtype");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == q.size(2), "rope: cos/sin [P, D]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == q.size(0), "rope: positions int64 [T]");
  const int64_t T = q.size(0), D = q.size(2), half = D / 2, P = cos.size(0);
  const at::Tensor pos = positions.contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(pp[t] >= 0 && pp[t] < P, "rope: position ", pp[t], " out of range");
  dispatch(q.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    auto rotate = [&](scalar_t* base, int64_t row_stride, int64_t head_stride, int64_t heads, int64_t t) {
      const scalar_t* c = cp + pp[t] * D;
      const scalar_t* s = sp + pp[t] * D;
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* x = base + t * row_stride + h * head_stride;
        // torch: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = ld(x, i), x2 = ld(x, i + half);
          const float a = rnd<scalar_t>(x1 * ld(c, i)), b = rnd<scalar_t>(-x2 * ld(s, i));
          const float e = rnd<scalar_t>(x2 * ld(c, i + half)), f = rnd<scalar_t>(x1 * ld(s, i + half));
          st(x, i, a + b);
          st(x, i + half, e + f);
        }
      }
    };
    scalar_t* qp = q.data_ptr<scalar_t>();
    scalar_t* kp = k.data_ptr<scalar_t>();
    const int64_t H = q.size(1), Hk = k.size(1);
    at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        rotate(qp, q.stride(0), q.stride(1), H, t);
        rotate(kp, k.stride(0), k.stride(1), Hk, t);
      }
    });
  });
}

// x [T, 2I] (gate | up) -> round(silu(gate)) * up, [T, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  TORCH_CHECK(x.size(1) == 2 * I, "silu_and_mul: the last dim must be even");
  at::Tensor y = at::empty({T, I}, x.options());
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t sx = x.stride(0);
    at::parallel_for(0, T, std::max<int64_t>(1, 16384 / I), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* g = xp + t * sx;
        const scalar_t* u = g + I;
        scalar_t* o = yp + t * I;
        for (int64_t i = 0; i < I; ++i) {
          const float gv = ld(g, i);
          st(o, i, rnd<scalar_t>(gv / (1.f + fast_exp(-gv))) * ld(u, i));
        }
      }
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(arborlm, CPU, m) {
  m.impl("rmsnorm", &rmsnorm);
  m.impl("rope_", &rope);
  m.impl("silu_and_mul", &silu_and_mul);
}
