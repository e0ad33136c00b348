// Large steps over a GGUF file's own block codes: int8 x int8 dot products on AVX-512 VNNI
// (engine/models/int8_blocks.py, the large-step copy "int8blk"):
//
//   out[m, n] = sum_b ( d[n, b] * sx[m, b] * (sum_{k in b} u[n, k] * xq[m, k]  -  z * sum_{k in b} xq[m, k])
//                       + min[n, b] * sum_{k in b} x[m, k] )
//
// over blocks b of 32 input columns. The weight is u = the file's codes as unsigned bytes with one scale d
// and one minimum per block: Q4_1 is u = code (0..15), z = 0; Q8_0 is u = code + 128, z = 128, no minimum.
// The activation x is quantized at each call per row per block (symmetric int8 xq, scale sx = max|x| / 127,
// llama.cpp's q8_1), with the block's sum kept for the minimum term: the sum of the *rounded* block, so the
// product is exactly (rounded x) . w. With the exact sum instead, Q4_1's minimum (about half the weight's
// range, the same sign over a block) multiplied the block's summed rounding error: 2.3x the output error on
// the real weights, 91 % top-1 instead of 96 %.
//
// vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and adds them into one int32 lane, so a vector is
// 16 output columns x 4 input columns: the weight is packed once at load (int8_blocks.py) as
// [N / 16][K / 4][16][4] bytes, and each activation's 4 bytes are broadcast to the 16 lanes. The -z * sum(xq)
// term is the int32 accumulator's starting value, so Q8_0 costs nothing more than Q4_1's codes.
// A register tile of kRows rows x 2 column vectors (32 columns) keeps each loaded weight vector in use for
// kRows products; the block's scales then cost a convert, a multiply and one or two FMAs per 8 dot products.
// Six rows, not four: 12 independent vpdpbusd chains (latency 5, two ports) instead of 8, +5-15 % here.
//
// int8_blocks_silu_mul is the same product for a fused gate/up weight (gate the first half of the output
// columns, up the second): a tile's two column vectors are gate column c and up column c, and it stores
// silu(gate) * up, so the MLP's [M, 2 I] intermediate and its SiLU pass never exist.
//
// int8_blocks_argmax is the product's row-wise argmax (an LM head under greedy sampling): each tile folds its
// values into the running best of its task's columns, so the [M, N] logits are never written nor read again.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

extern "C" __m512 Sleef_expf16_u10(__m512 x);   // in libtorch_cpu (torch's vectorized exp on AVX-512)

namespace {

constexpr int64_t kBlock = 32;     // input columns per scale (GGUF's block)
constexpr int64_t kLanes = 16;     // output columns per vector
constexpr int64_t kRows = 6;       // activation rows per register tile
constexpr int64_t kRowChunk = 256; // activation rows kept in L2 while the weight panel passes over them

struct Acts {
  const int8_t* q;        // [M, K]
  const float* scale;     // [M, G]
  const float* sum;       // [M, G]: sums of the rounded x over each block (minimum term)
  const int32_t* zterm;   // [M, G]: -z * sum(xq) over each block
  int64_t G;
};

struct Panel {
  const uint8_t* codes;   // [T, K / 4, 16, 4]
  const float* scale;     // [T, G, 16]
  const float* minimum;   // [T, G, 16] or nullptr
  int64_t N, K, G;
  int64_t step;           // column vectors between a tile's two vectors: 1, or I / 16 for gate and up
  int64_t ldo;            // output row stride: N, or I for silu(gate) * up
};

// How a tile leaves its values: stored, stored as silu(gate) * up, or folded into a per-row running argmax.
enum class Out { kStore, kGlu, kArgmax };

// The argmax so far of each row over one task's columns: the first largest value, NaN counted largest (the
// first NaN wins, as torch.argmax); index -1 before the task's first tile.
struct Best {
  float* value;     // [M]
  int64_t* index;   // [M]
};

#if defined(INFERSTACK_ISA_AVX2) || defined(INFERSTACK_ISA_BASELINE)
bool cpu_vnni() { return false; }
#else
bool cpu_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}
#endif

// One row: per block the scale max|x| / 127, the codes round(x / scale) (nearest, ties to even, as
// torch.round), the sum of the rounded block (scale * sum of the codes) and -z * sum of the codes.
__attribute__((target("avx512f,avx512bw"))) void quantize_row(const float* x, int64_t G, int32_t zero, int8_t* q,
                                                              float* scale, float* sum, int32_t* zterm) {
  for (int64_t g = 0; g < G; ++g) {
    const __m512 lo = _mm512_loadu_ps(x + g * kBlock), hi = _mm512_loadu_ps(x + g * kBlock + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const float s = amax / 127.f;
    const __m512 inv = _mm512_set1_ps(s > 0.f ? 1.f / s : 0.f);
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * kBlock), _mm512_cvtsepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * kBlock + 16), _mm512_cvtsepi32_epi8(qhi));
    scale[g] = s;
    const int32_t codes = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    sum[g] = s * static_cast<float>(codes);
    zterm[g] = -zero * codes;
  }
}

// silu(g) * u exactly as torch's F.silu(gate).mul_(up) rounds it on an AVX-512 CPU (aten's silu_kernel:
// g / (1 + exp(-g)) with Vectorized<float>::exp, which is SLEEF's expf16_u10; libtorch_cpu exports it). Bit for
// bit matters more than it seems: a 1-ulp change in SiLU's output flips an int8 code of the down projection's
// input now and then, and the flips cascade through the layers; on the 384-position accuracy check such
// changes moved top-1 between 0.92 and 0.96 (docs/benchmarks.md, helper c14f).
__attribute__((target("avx512f"))) inline __m512 silu_mul(__m512 g, __m512 u) {
  const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_set1_ps(-0.f), g));   // -0 - g: torch's neg (sign flip)
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}

// Folds one row's values in column vectors t0 .. t0 + NR - 1 (the columns past N masked off) into best[m].
// Columns rise from tile to tile within a task, so a strictly larger maximum replaces the best and a tie
// keeps the earlier column; a NaN, once held, stays (every comparison with it is false).
template <int NR>
__attribute__((target("avx512f"))) inline void fold_best(const __m512* v, int64_t t0, int64_t N, int64_t m,
                                                         Best& best) {
  __mmask16 valid[NR], nan = 0;
  int nan_at = -1;
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int j = 0; j < NR; ++j) {
    const int64_t n = (t0 + j) * kLanes;
    valid[j] = n + kLanes <= N ? 0xFFFF : (n >= N ? 0 : static_cast<__mmask16>((1u << (N - n)) - 1));
    nan = _mm512_mask_cmp_ps_mask(valid[j], v[j], v[j], _CMP_UNORD_Q);
    if (nan != 0 && nan_at < 0) nan_at = j * kLanes + __builtin_ctz(nan);
    top = _mm512_mask_max_ps(top, valid[j], top, v[j]);
  }
  float& held = best.value[m];
  int64_t& at = best.index[m];
  if (nan_at >= 0) {
    if (!std::isnan(held)) {
      held = std::numeric_limits<float>::quiet_NaN();
      at = t0 * kLanes + nan_at;
    }
    return;
  }
  const float mx = _mm512_reduce_max_ps(top);
  if (at >= 0 && !(mx > held)) return;
  for (int j = 0; j < NR; ++j) {
    const __mmask16 eq = _mm512_mask_cmp_ps_mask(valid[j], v[j], _mm512_set1_ps(mx), _CMP_EQ_OQ);
    if (eq != 0) {
      held = mx;
      at = (t0 + j) * kLanes + __builtin_ctz(eq);
      return;
    }
  }
}

// out[m0 : m0 + MR, 16 * t0 : 16 * (t0 + NR)] for column vectors t0, t0 + step.. (the last may be partial:
// masked store); with kGlu (NR 2, step I / 16) out[m0 : m0 + MR, 16 * t0 : 16 * t0 + 16] = silu(gate) * up;
// with kArgmax the values go into `best` instead (fold_best).
template <int MR, int NR, bool MIN, Out O>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile(const Acts& x, const Panel& w, int64_t m0,
                                                                  int64_t t0, float* out, Best& best) {
  __m512 acc[MR][NR];
  #pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
    #pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K = w.K, G = w.G;
  for (int64_t g = 0; g < G; ++g) {
    __m512i dot[MR][NR];
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i start = _mm512_set1_epi32(x.zterm[(m0 + i) * G + g]);
      #pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) dot[i][j] = start;
    }
    #pragma GCC unroll 8
    for (int64_t s = 0; s < kBlock / 4; ++s) {
      const int64_t k = g * kBlock + 4 * s;
      __m512i wv[NR];
      #pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) wv[j] = _mm512_loadu_si512(w.codes + (t0 + j * w.step) * K * kLanes + k * kLanes);
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        int32_t four;
        __builtin_memcpy(&four, x.q + (m0 + i) * K + k, 4);
        const __m512i xv = _mm512_set1_epi32(four);
        #pragma GCC unroll 2
        for (int j = 0; j < NR; ++j) dot[i][j] = _mm512_dpbusd_epi32(dot[i][j], wv[j], xv);
      }
    }
    __m512 d[NR], mn[NR];
    #pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) {
      d[j] = _mm512_loadu_ps(w.scale + ((t0 + j * w.step) * G + g) * kLanes);
      if (MIN) mn[j] = _mm512_loadu_ps(w.minimum + ((t0 + j * w.step) * G + g) * kLanes);
    }
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 sx = _mm512_set1_ps(x.scale[(m0 + i) * G + g]);
      const __m512 xs = _mm512_set1_ps(MIN ? x.sum[(m0 + i) * G + g] : 0.f);
      #pragma GCC unroll 2
      for (int j = 0; j < NR; ++j) {
        acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i][j]), _mm512_mul_ps(d[j], sx), acc[i][j]);
        if (MIN) acc[i][j] = _mm512_fmadd_ps(mn[j], xs, acc[i][j]);
      }
    }
  }
  if constexpr (O == Out::kArgmax) {
    for (int i = 0; i < MR; ++i) fold_best<NR>(acc[i], t0, w.N, m0 + i, best);
  } else if constexpr (O == Out::kGlu) {
    static_assert(NR == 2, "silu(gate) * up takes one gate and one up vector");
    #pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) _mm512_storeu_ps(out + (m0 + i) * w.ldo + t0 * kLanes, silu_mul(acc[i][0], acc[i][1]));
  } else {
    #pragma GCC unroll 2
    for (int j = 0; j < NR; ++j) {
      const int64_t n = (t0 + j) * kLanes;
      const __mmask16 mask = n + kLanes <= w.N ? 0xFFFF : static_cast<__mmask16>((1u << (w.N - n)) - 1);
      #pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(out + (m0 + i) * w.ldo + n, mask, acc[i][j]);
    }
  }
}

// The rows left over after whole tiles of kRows: the row count is a template argument (registers).
template <int NR, bool MIN, Out O>
void rows(const Acts& x, const Panel& w, int64_t m0, int64_t mb, int64_t t0, float* out, Best& best) {
  switch (mb) {
    case 1: return tile<1, NR, MIN, O>(x, w, m0, t0, out, best);
    case 2: return tile<2, NR, MIN, O>(x, w, m0, t0, out, best);
    case 3: return tile<3, NR, MIN, O>(x, w, m0, t0, out, best);
    case 4: return tile<4, NR, MIN, O>(x, w, m0, t0, out, best);
    case 5: return tile<5, NR, MIN, O>(x, w, m0, t0, out, best);
    default: return tile<kRows, NR, MIN, O>(x, w, m0, t0, out, best);
  }
}

// Output column vectors [tb, te) against activation rows [mb, me): pairs (t, t + 1), the last one alone; with
// GLU each t is a gate vector, paired with its up vector t + step.
template <bool MIN, Out O>
void panel(const Acts& x, const Panel& w, int64_t mb, int64_t me, int64_t tb, int64_t te, float* out, Best& best) {
  constexpr bool glu = O == Out::kGlu;
  for (int64_t t = tb; t < te; t += glu ? 1 : 2) {
    for (int64_t m = mb; m < me; m += kRows) {
      const int64_t rows_left = std::min(kRows, me - m);
      if (glu || t + 1 < te) rows<2, MIN, O>(x, w, m, rows_left, t, out, best);
      else rows<1, MIN, glu ? Out::kStore : O>(x, w, m, rows_left, t, out, best);
    }
  }
}

// Column vectors [tb, te) against all M rows, walked in row chunks that stay in L2.
template <Out O>
void columns(const Acts& a, const Panel& w, int64_t M, int64_t tb, int64_t te, float* out, Best& best) {
  for (int64_t mb = 0; mb < M; mb += kRowChunk) {
    const int64_t me = std::min(M, mb + kRowChunk);
    if (w.minimum != nullptr) panel<true, O>(a, w, mb, me, tb, te, out, best);
    else panel<false, O>(a, w, mb, me, tb, te, out, best);
  }
}

// Each task takes `per_task` column vectors (pairs; gate vectors with kGlu).
template <Out O>
void run(const Acts& a, const Panel& w, int64_t M, int64_t vectors, float* out) {
  const int64_t per_task = O == Out::kGlu ? 1 : 2;
  Best none{nullptr, nullptr};
  at::parallel_for(0, (vectors + per_task - 1) / per_task, 1, [&](int64_t begin, int64_t end) {
    columns<O>(a, w, M, per_task * begin, std::min(vectors, per_task * end), out, none);
  });
}

}  // namespace

// Whether this CPU (and this build, extension.py's ISA variants) runs int8_blocks_matmul.
bool int8_blocks_supported() { return cpu_vnni(); }

namespace {

// The checked inputs and the quantized activation of one call (the tensors own the buffers `acts` points to).
struct Call {
  at::Tensor xq, xs, zterm;
  Acts acts;
  Panel panel;
  int64_t M, T;
};

Call prepare(const char* fn, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
             const at::Tensor& minimum, int64_t zero) {
  TORCH_CHECK(cpu_vnni(), fn, ": this CPU or build has no AVX-512 VNNI");
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 4 && codes.size(2) == kLanes && codes.size(3) == 4,
              fn, ": x [M, K] and codes [T, K / 4, 16, 4]");
  const int64_t M = x.size(0), K = x.size(1), T = codes.size(0), G = K / kBlock;
  TORCH_CHECK(K % kBlock == 0 && codes.size(1) * 4 == K, fn, ": K must be a multiple of 32");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), fn, ": codes uint8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == T * G * kLanes,
              fn, ": scale float32 [T, K / 32, 16]");
  const bool has_min = minimum.numel() > 0;
  TORCH_CHECK(!has_min || (minimum.scalar_type() == at::kFloat && minimum.is_contiguous() &&
                           minimum.numel() == T * G * kLanes), fn, ": minimum like scale or empty");
  TORCH_CHECK(zero == 0 || zero == 128, fn, ": zero 0 or 128");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  Call c{at::empty({M, K}, xf.options().dtype(at::kChar)), at::empty({2, M, G}, xf.options()),
         at::empty({M, G}, xf.options().dtype(at::kInt)), {}, {}, M, T};
  const float* xp = xf.data_ptr<float>();
  int8_t* q = c.xq.data_ptr<int8_t>();
  float* xs = c.xs.data_ptr<float>();
  int32_t* zt = c.zterm.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      quantize_row(xp + m * K, G, static_cast<int32_t>(zero), q + m * K, xs + m * G, xs + (M + m) * G, zt + m * G);
    }
  });
  c.acts = Acts{q, xs, xs + M * G, zt, G};
  c.panel = Panel{codes.data_ptr<uint8_t>(), scale.data_ptr<float>(), has_min ? minimum.data_ptr<float>() : nullptr,
                  0, K, G, 1, 0};
  return c;
}

}  // namespace

// x [M, K] (any float dtype), codes uint8 [T, K / 4, 16, 4], scale float32 [T, K / 32, 16], minimum the same
// or empty, zero 0 or 128, n the output columns (<= 16 T) -> [M, n] float32.
at::Tensor int8_blocks_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const at::Tensor& minimum, int64_t zero, int64_t n) {
  Call c = prepare("int8_blocks_matmul", x, codes, scale, minimum, zero);
  TORCH_CHECK(n > (c.T - 1) * kLanes && n <= c.T * kLanes,
              "int8_blocks_matmul: zero 0 or 128, n within the last column vector");
  c.panel.N = c.panel.ldo = n;
  at::Tensor out = at::empty({c.M, n}, c.xs.options());
  run<Out::kStore>(c.acts, c.panel, c.M, c.T, out.data_ptr<float>());
  return out;
}

// The same for a fused gate/up weight of n = 2 I output columns (gate [0, I), up [I, 2 I), I a multiple of 16):
// silu(x gate^T) * (x up^T) -> [M, I] float32.
at::Tensor int8_blocks_silu_mul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                                const at::Tensor& minimum, int64_t zero, int64_t n) {
  Call c = prepare("int8_blocks_silu_mul", x, codes, scale, minimum, zero);
  TORCH_CHECK(c.T % 2 == 0 && n == c.T * kLanes, "int8_blocks_silu_mul: n = 2 I output columns, I % 16 == 0");
  const int64_t half = c.T / 2;
  c.panel.N = c.T * kLanes;
  c.panel.ldo = half * kLanes;
  c.panel.step = half;
  at::Tensor out = at::empty({c.M, half * kLanes}, c.xs.options());
  run<Out::kGlu>(c.acts, c.panel, c.M, half, out.data_ptr<float>());
  return out;
}

// argmax over the columns of int8_blocks_matmul's product, per row -> [M] int64: the same index as
// torch.argmax(int8_blocks_matmul(...), dim=1) (first maximum, first NaN), without the [M, n] product. The
// columns are cut into a few ranges per thread; each range keeps its rows' best (Best) and the ranges are
// then merged in column order, so the answer does not depend on the thread count.
at::Tensor int8_blocks_argmax(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const at::Tensor& minimum, int64_t zero, int64_t n) {
  Call c = prepare("int8_blocks_argmax", x, codes, scale, minimum, zero);
  TORCH_CHECK(n > (c.T - 1) * kLanes && n <= c.T * kLanes && n > 0,
              "int8_blocks_argmax: n within the last column vector");
  c.panel.N = c.panel.ldo = n;
  const int64_t pairs = (c.T + 1) / 2, ranges = std::min<int64_t>(pairs, 4 * at::get_num_threads());
  at::Tensor values = at::full({ranges, c.M}, -std::numeric_limits<float>::infinity(), c.xs.options());
  at::Tensor indices = at::full({ranges, c.M}, -1, c.xs.options().dtype(at::kLong));
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, ranges, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Best best{vp + r * c.M, ip + r * c.M};
      const int64_t tb = 2 * (pairs * r / ranges), te = std::min(c.T, 2 * (pairs * (r + 1) / ranges));
      columns<Out::kArgmax>(c.acts, c.panel, c.M, tb, te, nullptr, best);
    }
  });
  at::Tensor out = at::empty({c.M}, indices.options());
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t m = 0; m < c.M; ++m) {
    float held = vp[m];
    int64_t at = ip[m];
    for (int64_t r = 1; r < ranges && !std::isnan(held); ++r) {
      const float v = vp[r * c.M + m];
      if (std::isnan(v) || v > held) {
        held = v;
        at = ip[r * c.M + m];
      }
    }
    op[m] = at;
  }
  return out;
}
