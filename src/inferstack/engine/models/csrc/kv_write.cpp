// The int8 KV cache's write (executor/kv_format.py, KVFormat.encode, then the cache's index_copy_) in one pass:
// each (token, KV head) row of head_dim activations becomes head_dim int8 codes and a float32 scale, written at
// the token's slot. The same bytes as the torch path: scale = max(max|x|, 1e-12) / 127 in float32, code =
// round-half-to-even(x / scale) clamped to [-127, 127] (a float32 division, not a multiply by the inverse). The
// torch path took ~10 small ops per call (62 us for 64 rows of SmolLM2's 3 KV heads, 1 thread; twice per layer
// in every step: 3.7 ms of a 64-row decode step, docs/benchmarks.md helper c14g). A row holding NaN has no
// meaningful codes either way (torch's scale is then NaN; this one's max skips NaN).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace {

#if defined(INFERSTACK_ISA_AVX2)
#define KV_CLONES __attribute__((target("avx2"), noinline))
#elif defined(INFERSTACK_ISA_BASELINE)
#define KV_CLONES __attribute__((noinline))
#else
#define KV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

constexpr int64_t kMaxHeadDim = 1024;

// 1.5 * 2^23: adding and subtracting it rounds a float32 of magnitude below 2^22 to an integer, half to even (the
// default rounding mode; the build's -ffp-contract=off keeps the two operations apart). std::nearbyint was a libm
// call per element here.
constexpr float kRoundMagic = 12582912.f;

// One row's codes into `codes`; returns its scale. Clamping before rounding gives what torch's round then clamp
// gives: every value past +-127 ends at +-127 either way.
KV_CLONES float encode_row(const float* x, int64_t hd, int8_t* codes) {
  float amax = 0.f;
  #pragma omp simd reduction(max : amax)
  for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(x[d]));
  const float scale = std::max(amax, 1e-12f) / 127.f;
  #pragma omp simd
  for (int64_t d = 0; d < hd; ++d) {
    const float clamped = std::min(127.f, std::max(-127.f, x[d] / scale));
    codes[d] = static_cast<int8_t>((clamped + kRoundMagic) - kRoundMagic);
  }
  return scale;
}

template <typename T>
void write_rows(const T* x, int64_t tokens, int64_t heads, int64_t hd, int64_t x_token_stride, int64_t x_head_stride,
                const int64_t* slots, uint8_t* cache, int64_t row_bytes) {
  at::parallel_for(0, tokens, 64, [&](int64_t begin, int64_t end) {
    float wide[kMaxHeadDim];
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const T* in = x + t * x_token_stride + h * x_head_stride;
        uint8_t* row = cache + slots[t] * heads * row_bytes + h * row_bytes;
        for (int64_t d = 0; d < hd; ++d) wide[d] = static_cast<float>(in[d]);
        const float scale = encode_row(wide, hd, reinterpret_cast<int8_t*>(row));
        std::memcpy(row + hd, &scale, sizeof(float));
      }
    }
  });
}

}  // namespace

// x [T, kv_heads, head_dim] (float32, bf16 or fp16; the last dimension contiguous), cache [slots, kv_heads *
// (head_dim + 4)] uint8 (one half of a layer's int8 cache, contiguous), slots [T] int64: writes row t at slots[t].
void kv_int8_write(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& slots) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.device().is_cpu(), "kv_int8_write: x [T, kv_heads, head_dim]");
  const int64_t tokens = x.size(0), heads = x.size(1), hd = x.size(2), row_bytes = hd + 4;
  TORCH_CHECK(hd <= kMaxHeadDim, "kv_int8_write: head_dim up to 1024");
  TORCH_CHECK(cache.dim() == 2 && cache.scalar_type() == at::kByte && cache.is_contiguous() &&
                  cache.size(1) == heads * row_bytes,
              "kv_int8_write: cache [slots, kv_heads * (head_dim + 4)] uint8, contiguous");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == tokens,
              "kv_int8_write: slots [T] int64");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(sp[t] >= 0 && sp[t] < cache.size(0), "kv_int8_write: slot out of range");
  }
  auto* cp = cache.data_ptr<uint8_t>();
  switch (x.scalar_type()) {
    case at::kFloat:
      return write_rows(x.data_ptr<float>(), tokens, heads, hd, x.stride(0), x.stride(1), sp, cp, row_bytes);
    case at::kBFloat16:
      return write_rows(x.data_ptr<at::BFloat16>(), tokens, heads, hd, x.stride(0), x.stride(1), sp, cp, row_bytes);
    case at::kHalf:
      return write_rows(x.data_ptr<at::Half>(), tokens, heads, hd, x.stride(0), x.stride(1), sp, cp, row_bytes);
    default:
      TORCH_CHECK(false, "kv_int8_write: x must be float32, bfloat16 or float16");
  }
}
