// RMSNorm of float32 rows in one pass, with the bits of layers.rms_norm's torch ops (transformers' formula):
//
//   out = (x * rsqrt(sum(x * x) / n + eps)) * w      (each operation rounded to float32; the last product
//                                                      rounded to bf16 instead when the projection takes bf16)
//
// The sum is the one that matters: torch's CPU sum over a contiguous row (aten SumKernel.cpp,
// vectorized_inner_sum -> row_sum -> multi_row_sum) adds the row's W-float vectors in four chains, vector
// 4 i + c into chain c, through a cascade of four levels of 2^level_power groups each; leftover vectors go to
// chain 0, the chains fold 0 + 1 + 2 + 3; then the scalar tail (n % W elements) from 0, then the W lanes left
// to right. W is 8 or 16: layers.norm_kernel finds torch's by comparing both at load (8 on this AVX-512 Xeon
// with torch 2.13). Replaying that order gives the same float sum, so the int8 codes that the next
// projection's activation quantization derives from the norm's output are unchanged (a 1-ulp change there
// moves the int8blk accuracy check by chance: docs/benchmarks.md, helper c14f). Torch spent six passes and
// five allocations per norm: ~90 us for a 64-row decode step's norm and ~3 ms for a 2,048-row prefill chunk's
// at load 8, 61 norms per step (docs/benchmarks.md, helper c14h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kChains = 4;    // row_sum's ilp_factor
constexpr int64_t kLevels = 4;    // multi_row_sum's num_levels

#if defined(INFERSTACK_ISA_AVX2)
#define NORM_CLONES __attribute__((target("avx2"), noinline))
#elif defined(INFERSTACK_ISA_BASELINE)
#define NORM_CLONES __attribute__((noinline))
#else
#define NORM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

int64_t ceil_log2(int64_t v) {
  int64_t c = 0;
  while ((int64_t(1) << c) < v) ++c;
  return c;
}

// Lane-wise only: each lane's additions stay in order, so vectorizing these loops changes no sum.
template <int L>
inline void add_square(float* acc, const float* x) {
  #pragma omp simd
  for (int l = 0; l < L; ++l) acc[l] += x[l] * x[l];
}

template <int L>
inline void add_vec(float* acc, float* other, bool clear) {
  #pragma omp simd
  for (int l = 0; l < L; ++l) {
    acc[l] += other[l];
    if (clear) other[l] = 0.f;
  }
}

// sum(x * x) over n floats in torch's order for vectors of L floats (see the header).
template <int L>
inline float torch_sum_of_squares(const float* x, int64_t n) {
  const int64_t vectors = n / L, groups = vectors / kChains;
  const int64_t power = std::max<int64_t>(4, ceil_log2(groups) / kLevels), step = int64_t(1) << power;
  const int64_t mask = step - 1;
  float acc[kLevels][kChains][L] = {};
  int64_t i = 0;
  while (i + step <= groups) {
    for (int64_t j = 0; j < step; ++j, ++i) {
      for (int64_t c = 0; c < kChains; ++c) add_square<L>(acc[0][c], x + (i * kChains + c) * L);
    }
    for (int64_t j = 1; j < kLevels; ++j) {
      for (int64_t c = 0; c < kChains; ++c) add_vec<L>(acc[j][c], acc[j - 1][c], true);
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < groups; ++i) {
    for (int64_t c = 0; c < kChains; ++c) add_square<L>(acc[0][c], x + (i * kChains + c) * L);
  }
  for (int64_t j = 1; j < kLevels; ++j) {
    for (int64_t c = 0; c < kChains; ++c) add_vec<L>(acc[0][c], acc[j][c], false);
  }
  for (int64_t v = groups * kChains; v < vectors; ++v) add_square<L>(acc[0][0], x + v * L);
  for (int64_t c = 1; c < kChains; ++c) add_vec<L>(acc[0][0], acc[0][c], false);
  float total = 0.f;
  for (int64_t k = vectors * L; k < n; ++k) total += x[k] * x[k];
  for (int l = 0; l < L; ++l) total += acc[0][0][l];
  return total;
}

// Round to nearest even as c10::BFloat16's constructor does (NaN to 0x7FC0), without its branch, so the loop
// below vectorizes (the constructor kept it scalar: 49 against torch's 39 us for 64 rows of 576).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

inline void store(float* out, float v) { *out = v; }
inline void store(uint16_t* out, float v) { *out = bf16_bits(v); }

template <int L, typename Out>
inline void norm_row(const float* x, const float* w, int64_t n, float eps, Out* out) {
  const float mean = torch_sum_of_squares<L>(x, n) / static_cast<float>(n);
  const float r = 1.f / std::sqrt(mean + eps);
  #pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float h = x[k] * r;
    store(out + k, h * w[k]);
  }
}

template <typename Out>
inline void norm_rows(const float* x, int64_t ld, const float* w, int64_t n, int64_t lanes, float eps, Out* out,
                      int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    if (lanes == 16) norm_row<16>(x + r * ld, w, n, eps, out + r * n);
    else norm_row<8>(x + r * ld, w, n, eps, out + r * n);
  }
}

NORM_CLONES void norm_rows_f32(const float* x, int64_t ld, const float* w, int64_t n, int64_t lanes, float eps,
                               float* out, int64_t begin, int64_t end) {
  norm_rows(x, ld, w, n, lanes, eps, out, begin, end);
}

NORM_CLONES void norm_rows_bf16(const float* x, int64_t ld, const float* w, int64_t n, int64_t lanes, float eps,
                                uint16_t* out, int64_t begin, int64_t end) {
  norm_rows(x, ld, w, n, lanes, eps, out, begin, end);
}

}  // namespace

// x float32 [R, n] with unit column stride, weight float32 [n], lanes torch's float vector width (8 or 16),
// bf16_out: the result rounded to bf16 instead of float32 -> [R, n].
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t lanes, bool bf16_out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "rms_norm_rows: x float32 [R, n]");
  const int64_t R = x.size(0), n = x.size(1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == n,
              "rms_norm_rows: weight float32 [n]");
  TORCH_CHECK(lanes == 8 || lanes == 16, "rms_norm_rows: lanes 8 or 16");
  at::Tensor out = at::empty({R, n}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const int64_t ld = x.stride(0);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
    if (bf16_out) norm_rows_bf16(xp, ld, wp, n, lanes, e, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()),
                                 begin, end);
    else norm_rows_f32(xp, ld, wp, n, lanes, e, out.data_ptr<float>(), begin, end);
  });
  return out;
}
