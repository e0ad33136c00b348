// Rotary position embedding (neox style, rotate halves) of a step's queries and keys in one pass
// (layers.py, Rotary.apply): for row x of a head at position t, with half = head_dim / 2,
//
//   out[:half] = x[:half] * cos[t, :half] + x[half:] * ssin[t, :half]
//   out[half:] = x[half:] * cos[t, half:] + x[:half] * ssin[t, half:]
//
// where cos = (cos | cos) and ssin = (-sin | sin) are the step's tables. Each product and the sum round to
// float32 as torch's mul, mul_ and add_ do (the build has -ffp-contract=off: no fused multiply-add), so the
// result is torch's bit for bit. Torch's form made a copy of the rotated halves (a cat over 32-float pieces)
// and four passes over the step's [T, heads, head_dim] activations; at 2,048 rows that was ~5 % of a prefill
// step's CPU time (docs/benchmarks.md, helper c14h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

namespace {

#if defined(INFERSTACK_ISA_AVX2)
#define ROTARY_CLONES __attribute__((target("avx2"), noinline))
#elif defined(INFERSTACK_ISA_BASELINE)
#define ROTARY_CLONES __attribute__((noinline))
#else
#define ROTARY_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

// One head's row: x and out [2 * half], cos and ssin the position's table rows.
ROTARY_CLONES void rotate_row(const float* x, const float* cos, const float* ssin, int64_t half, float* out) {
  #pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i] * cos[i], b = x[half + i] * ssin[i];
    out[i] = a + b;
  }
  #pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[half + i] * cos[half + i], b = x[i] * ssin[half + i];
    out[half + i] = a + b;
  }
}

}  // namespace

// x float32 [T, H, D] (any row and head strides, unit stride within a head), cos and ssin float32 [T, 1, D]
// contiguous -> [T, H, D] float32 contiguous.
at::Tensor rotary_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& ssin) {
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.stride(2) == 1, "rotary_apply: x float32 [T, H, D]");
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "rotary_apply: head_dim must be even");
  for (const at::Tensor* table : {&cos, &ssin}) {
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->numel() == T * D,
                "rotary_apply: cos and ssin float32 [T, 1, D] contiguous");
  }
  at::Tensor out = at::empty({T, H, D}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const float* xp = x.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = ssin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        rotate_row(xp + t * xs0 + h * xs1, cp + t * D, sp + t * D, D / 2, op + (t * H + h) * D);
      }
    }
  });
  return out;
}
