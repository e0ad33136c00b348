// Grouped int8 matmul in one pass over the weights (engine/models/quant_linear.py, kind "int8g"):
//
//   out[m, n] = sum_g ( scale[n, g] * sum_{k in g} q[n, k] * x[m, k]  +  offset[n, g] * sum_{k in g} x[m, k] )
//
// which is GGUF's Q8_0 (int8 codes, one fp16 scale per 32, held here as float32) and our own grouped int8
// (the same with an optional per-group offset). torch has no kernel that takes int8 with group scales, so
// without this the engine runs such a weight as two int4 matmuls over its nibble planes: two passes over
// the bytes, and scales rounded to bf16. Here the products and sums are float32, the scales exact.
//
// The batch-1 LM head of SmolLM2 (49,152 x 576) is 28 MB of int8 read once per token: the loop is
// memory-bound, so what matters is one pass and both cores (at::parallel_for over output rows). The
// vector width is picked at run time from what this CPU runs (GCC's __builtin_cpu_supports checks that
// the OS enabled the registers, not only that the CPU has them): AVX-512, else AVX2 + FMA, else scalar.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <string>

namespace {

struct Args {
  const float* x;       // [M, K] activations as float32
  const float* xsum;    // [M, G] per-group sums of x (offset term), or nullptr
  const int8_t* q;      // [N, K]
  const float* scale;   // [N, G]
  const float* offset;  // [N, G] or nullptr
  float* out;           // [M, N]
  int64_t M, N, K, group;
};

constexpr int64_t kRowBlock = 4;   // activation rows per pass over one weight row (each code converted once)

// One weight row n against up to kRowBlock activation rows [m0, m0 + mb), scalar.
void row_scalar(const Args& a, int64_t n, int64_t m0, int64_t mb) {
  const int64_t G = a.K / a.group;
  const int8_t* w = a.q + n * a.K;
  for (int64_t m = m0; m < m0 + mb; ++m) {
    const float* x = a.x + m * a.K;
    float total = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      float dot = 0.f;
      for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) dot += static_cast<float>(w[k]) * x[k];
      total += a.scale[n * G + g] * dot;
      if (a.offset != nullptr) total += a.offset[n * G + g] * a.xsum[m * G + g];
    }
    a.out[m * a.N + n] = total;
  }
}

__attribute__((target("avx2,fma"))) float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// AVX2: 8 weights per step (group % 8 == 0).
template <int64_t mb>
__attribute__((target("avx2,fma"))) void row_avx2(const Args& a, int64_t n, int64_t m0) {
  const int64_t G = a.K / a.group;
  const int8_t* w = a.q + n * a.K;
  __m256 acc[mb], odd[mb];   // even and odd groups: two dependency chains instead of one
  #pragma GCC unroll 4
  for (int64_t j = 0; j < mb; ++j) acc[j] = odd[j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 dot[mb];
    #pragma GCC unroll 4
    for (int64_t j = 0; j < mb; ++j) dot[j] = _mm256_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 8) {
      const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + k));
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes));
      #pragma GCC unroll 4
      for (int64_t j = 0; j < mb; ++j) dot[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(a.x + (m0 + j) * a.K + k), dot[j]);
    }
    const __m256 s = _mm256_set1_ps(a.scale[n * G + g]);
    #pragma GCC unroll 4
    for (int64_t j = 0; j < mb; ++j) {
      if (g % 2 == 0) acc[j] = _mm256_fmadd_ps(dot[j], s, acc[j]);
      else odd[j] = _mm256_fmadd_ps(dot[j], s, odd[j]);
    }
  }
  #pragma GCC unroll 4
  for (int64_t j = 0; j < mb; ++j) acc[j] = _mm256_add_ps(acc[j], odd[j]);
  #pragma GCC unroll 4
  for (int64_t j = 0; j < mb; ++j) {
    float total = hsum256(acc[j]);
    if (a.offset != nullptr) {
      for (int64_t g = 0; g < G; ++g) total += a.offset[n * G + g] * a.xsum[(m0 + j) * G + g];
    }
    a.out[(m0 + j) * a.N + n] = total;
  }
}

// AVX-512: 16 weights per step (group % 16 == 0).
template <int64_t mb>
__attribute__((target("avx512f"))) void row_avx512(const Args& a, int64_t n, int64_t m0) {
  const int64_t G = a.K / a.group;
  const int8_t* w = a.q + n * a.K;
  __m512 acc[mb], odd[mb];   // even and odd groups: two dependency chains instead of one
  #pragma GCC unroll 4
  for (int64_t j = 0; j < mb; ++j) acc[j] = odd[j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 dot[mb];
    #pragma GCC unroll 4
    for (int64_t j = 0; j < mb; ++j) dot[j] = _mm512_setzero_ps();
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 16) {
      const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes));
      #pragma GCC unroll 4
      for (int64_t j = 0; j < mb; ++j) dot[j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(a.x + (m0 + j) * a.K + k), dot[j]);
    }
    const __m512 s = _mm512_set1_ps(a.scale[n * G + g]);
    #pragma GCC unroll 4
    for (int64_t j = 0; j < mb; ++j) {
      if (g % 2 == 0) acc[j] = _mm512_fmadd_ps(dot[j], s, acc[j]);
      else odd[j] = _mm512_fmadd_ps(dot[j], s, odd[j]);
    }
  }
  #pragma GCC unroll 4
  for (int64_t j = 0; j < mb; ++j) acc[j] = _mm512_add_ps(acc[j], odd[j]);
  #pragma GCC unroll 4
  for (int64_t j = 0; j < mb; ++j) {
    float total = _mm512_reduce_add_ps(acc[j]);
    if (a.offset != nullptr) {
      for (int64_t g = 0; g < G; ++g) total += a.offset[n * G + g] * a.xsum[(m0 + j) * G + g];
    }
    a.out[(m0 + j) * a.N + n] = total;
  }
}

// One activation row (a batch-1 step's LM head) against kRows weight rows at once: each row's sums run
// in exactly row_avx512<1>'s order (bit for bit the same output), but the rows' independent FMA chains
// interleave, so the core is not waiting on one row's dependency chain and final reduction at a time, and
// the codes kPrefetchRows rows ahead are prefetched: the head is read from memory once per token (the body's
// weights pass through the cache in between), and one row at a time without prefetch reached about half of
// a core's streaming bandwidth. Measured (LM head, 1 thread, CPU time, cache flushed between calls, base and
// this build alternating): 4.40 -> 2.83 ms median; 4 rows ahead 2.92, 16 rows 3.38, interleaving alone
// without prefetch no gain (6.25 vs 5.58).
constexpr int64_t kRows = 4;
constexpr int64_t kPrefetchRows = 8;

__attribute__((target("avx512f"))) void rows_avx512_m1(const Args& a, int64_t n0) {
  const int64_t G = a.K / a.group;
  __m512 acc[kRows], odd[kRows];
  #pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r) acc[r] = odd[r] = _mm512_setzero_ps();
  // The rows kPrefetchRows further on (the last block's own rows at the end of the matrix).
  const int8_t* ahead = a.q + std::min(n0 + kPrefetchRows, a.N - kRows) * a.K;
  for (int64_t g = 0; g < G; ++g) {
    __m512 dot[kRows];
    #pragma GCC unroll 4
    for (int64_t r = 0; r < kRows; ++r) dot[r] = _mm512_setzero_ps();
    if (g % 2 == 0) {   // one 64-byte line covers two groups of 32 codes
      #pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + r * a.K + g * a.group), _MM_HINT_T0);
      }
    }
    for (int64_t k = g * a.group; k < (g + 1) * a.group; k += 16) {
      const __m512 xv = _mm512_loadu_ps(a.x + k);
      #pragma GCC unroll 4
      for (int64_t r = 0; r < kRows; ++r) {
        const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.q + (n0 + r) * a.K + k));
        dot[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), xv, dot[r]);
      }
    }
    #pragma GCC unroll 4
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512 s = _mm512_set1_ps(a.scale[(n0 + r) * G + g]);
      if (g % 2 == 0) acc[r] = _mm512_fmadd_ps(dot[r], s, acc[r]);
      else odd[r] = _mm512_fmadd_ps(dot[r], s, odd[r]);
    }
  }
  #pragma GCC unroll 4
  for (int64_t r = 0; r < kRows; ++r) {
    float total = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], odd[r]));
    if (a.offset != nullptr) {
      for (int64_t g = 0; g < G; ++g) total += a.offset[(n0 + r) * G + g] * a.xsum[g];
    }
    a.out[n0 + r] = total;
  }
}

using RowFn = void (*)(const Args&, int64_t, int64_t, int64_t);

// The block size is a template argument so that the accumulators live in registers.
__attribute__((target("avx512f"))) void rows_avx512(const Args& a, int64_t n, int64_t m0, int64_t mb) {
  switch (mb) {
    case 1: return row_avx512<1>(a, n, m0);
    case 2: return row_avx512<2>(a, n, m0);
    case 3: return row_avx512<3>(a, n, m0);
    default: return row_avx512<4>(a, n, m0);
  }
}

__attribute__((target("avx2,fma"))) void rows_avx2(const Args& a, int64_t n, int64_t m0, int64_t mb) {
  switch (mb) {
    case 1: return row_avx2<1>(a, n, m0);
    case 2: return row_avx2<2>(a, n, m0);
    case 3: return row_avx2<3>(a, n, m0);
    default: return row_avx2<4>(a, n, m0);
  }
}

// What this CPU runs. A build for one instruction set (extension.py, INFERSTACK_DECODE_ISA) takes the
// wider ones as absent, as a CPU without them would, so the tests here run the choice such a CPU makes.
#if defined(INFERSTACK_ISA_AVX2) || defined(INFERSTACK_ISA_BASELINE)
bool cpu_avx512() { return false; }
#else
bool cpu_avx512() { return __builtin_cpu_supports("avx512f"); }
#endif
#if defined(INFERSTACK_ISA_BASELINE)
bool cpu_avx2_fma() { return false; }
#else
bool cpu_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#endif

// The widest variant this CPU runs for ``group``; ``isa`` ("avx512", "avx2", "scalar") asks for one
// (tests run every variant the CPU has), and one the CPU cannot run is refused.
RowFn pick(int64_t group, const std::string& isa) {
  const bool avx512 = group % 16 == 0 && cpu_avx512();
  const bool avx2 = group % 8 == 0 && cpu_avx2_fma();
  if (isa.empty()) return avx512 ? rows_avx512 : avx2 ? rows_avx2 : row_scalar;
  TORCH_CHECK(isa == "scalar" || (isa == "avx2" && avx2) || (isa == "avx512" && avx512),
              "q8_matmul: this CPU or group size cannot run '", isa, "'");
  return isa == "avx512" ? rows_avx512 : isa == "avx2" ? rows_avx2 : row_scalar;
}

}  // namespace

// The vector width this CPU runs the kernel with ("avx512", "avx2" or "scalar"), for logs and tests.
std::string q8_isa(int64_t group) {
  const RowFn fn = pick(group, "");
  return fn == rows_avx512 ? "avx512" : fn == rows_avx2 ? "avx2" : "scalar";
}

// x [M, K] (any float dtype), q [N, K] int8, scale [N, K / group] float32, offset the same shape or an
// empty tensor (symmetric) -> [M, N] float32. ``isa``: see pick ("": the widest).
at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset,
                     int64_t group, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && x.size(1) == q.size(1), "q8_matmul: x [M, K] and q [N, K]");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "q8_matmul: q must be contiguous int8");
  const int64_t M = x.size(0), N = q.size(0), K = q.size(1);
  TORCH_CHECK(group > 0 && K % group == 0, "q8_matmul: K must be a multiple of the group size");
  const int64_t G = K / group;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N * G,
              "q8_matmul: scale must be contiguous float32 [N, K / group]");
  const bool has_offset = offset.numel() > 0;
  TORCH_CHECK(!has_offset || (offset.scalar_type() == at::kFloat && offset.is_contiguous() && offset.numel() == N * G),
              "q8_matmul: offset must be empty or contiguous float32 [N, K / group]");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xsum;
  if (has_offset) xsum = xf.view({M, G, group}).sum(-1).contiguous();
  at::Tensor out = at::empty({M, N}, xf.options());
  const Args a{xf.data_ptr<float>(), has_offset ? xsum.data_ptr<float>() : nullptr, q.data_ptr<int8_t>(),
               scale.data_ptr<float>(), has_offset ? offset.data_ptr<float>() : nullptr, out.data_ptr<float>(),
               M, N, K, group};
  const RowFn fn = pick(group, isa);
  // 64 rows of the head are ~37 KB of weights: enough work per task that the pool's overhead is noise.
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    // A tile of weight rows stays in L1 while every block of activation rows passes over it.
    for (int64_t tile = begin; tile < end; tile += 16) {
      const int64_t tile_end = std::min(tile + 16, end);
      int64_t n = tile;
      if (M == 1 && fn == rows_avx512) {
        for (; n + kRows <= tile_end; n += kRows) rows_avx512_m1(a, n);
      }
      for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
        const int64_t mb = std::min(kRowBlock, M - m0);
        for (int64_t r = n; r < tile_end; ++r) fn(a, r, m0, mb);
      }
    }
  });
  return out;
}
