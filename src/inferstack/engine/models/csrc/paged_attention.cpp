// Decode attention for many sequences at once, read in place from the paged KV cache
// (engine/executor/attention.py, ``_decode``).
//
// The torch path gathers every decode sequence's context through the block tables into a padded
// [B, kv_heads, L, head_dim] copy and attends over it with two matmuls or SDPA; at 64 sequences x 256
// tokens the copy is ~7-12 MB per layer, more than the attention's arithmetic. Here each (sequence,
// KV head) pair reads its rows where they lie: slot = table[t / block_size] * block_size + t % block_size.
// All query heads of the KV head's group share each key and value row once it is converted to float32.
//
// Numerics: scores, softmax and the weighted sum in float32 (two passes: scores, then values), one
// rounding to the query dtype at the end. A quantized row (int8 / fp8_e4m3 codes and a float32 scale,
// executor/kv_format.py) is dequantized and rounded to the query dtype as KVFormat.decode rounds it, so
// both paths attend over the same values. The exponential is a Cephes-style polynomial (~2 float32 ulp)
// written so the compiler vectorizes it; SDPA's softmax uses its own vector exp of the same accuracy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using bf16 = at::BFloat16;
using half = at::Half;

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMaxGroup = 16;

// Storage kinds besides plain element types: one-byte codes then a float32 scale per row.
struct Int8Codes {};
struct Fp8Codes {};

template <typename C>
inline float round_to(float v) {
  return static_cast<float>(static_cast<C>(v));
}
template <>
inline float round_to<float>(float v) {
  return v;
}

// One cache row -> head_dim floats, rounded to C (the query dtype) as KVFormat.decode rounds.
template <typename S, typename C>
struct Row {
  static inline void load(const uint8_t* p, int64_t hd, float* dst) {
    const S* x = reinterpret_cast<const S*>(p);
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) dst[d] = round_to<C>(static_cast<float>(x[d]));
  }
};

template <typename C>
struct Row<Int8Codes, C> {
  static inline void load(const uint8_t* p, int64_t hd, float* dst) {
    float scale;
    std::memcpy(&scale, p + hd, sizeof(float));
    const int8_t* x = reinterpret_cast<const int8_t*>(p);
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) dst[d] = round_to<C>(static_cast<float>(x[d]) * scale);
  }
};

template <typename C>
struct Row<Fp8Codes, C> {
  static inline void load(const uint8_t* p, int64_t hd, float* dst) {
    float scale;
    std::memcpy(&scale, p + hd, sizeof(float));
    const c10::Float8_e4m3fn* x = reinterpret_cast<const c10::Float8_e4m3fn*>(p);
    for (int64_t d = 0; d < hd; ++d) dst[d] = round_to<C>(static_cast<float>(x[d]) * scale);
  }
};

// exp(x) for x <= 0 (scores minus their maximum): Cephes expf's reduction and polynomial, branch-free so
// a loop over it vectorizes; below -87 (where float32 exp underflows) it returns 0.
inline float exp_nonpositive(float x) {
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t e = (static_cast<int32_t>(std::max(n, -126.f)) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &e, sizeof(float));
  return x < -87.f ? 0.f : p * two_n;
}

struct Shape {
  int64_t nh, nkv, hd, group, block_size, max_blocks, row_bytes;   // row_bytes: one (slot, KV head) row
  int64_t half_bytes;                                              // keys, then values
  float scale;
};

// The key rows of one (sequence, KV head)'s first ``length`` positions, block by block (no division per
// position); its value rows lie ``half_bytes`` further.
inline void context_rows(const uint8_t* cache, const int64_t* table, int64_t length, int64_t kvh, const Shape& s,
                         const uint8_t** rows) {
  const int64_t step = s.nkv * s.row_bytes;
  for (int64_t start = 0, blk = 0; start < length; start += s.block_size, ++blk) {
    const uint8_t* row = cache + (table[blk] * s.block_size * s.nkv + kvh) * s.row_bytes;
    for (int64_t t = start; t < std::min(length, start + s.block_size); ++t, row += step) rows[t] = row;
  }
}

// One (sequence, KV head): every query head of the group against the context's rows in the cache.
// ``scores`` holds group * length floats.
template <typename S, typename C>
inline void attend_pair(const C* q, const uint8_t* const* rows, int64_t length, const Shape& s, float* scores,
                        C* out) {
  const int64_t hd = s.hd, g = s.group;
  float qf[kMaxGroup * kMaxHeadDim];
  float row[kMaxHeadDim];
  float acc[kMaxGroup * kMaxHeadDim];
  for (int64_t i = 0; i < g * hd; ++i) qf[i] = static_cast<float>(q[i]);
  for (int64_t t = 0; t < length; ++t) {
    Row<S, C>::load(rows[t], hd, row);
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = qf + j * hd;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < hd; ++d) dot += qj[d] * row[d];
      scores[j * length + t] = dot * s.scale;
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* p = scores + j * length;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < length; ++t) top = std::max(top, p[t]);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t t = 0; t < length; ++t) {
      p[t] = exp_nonpositive(p[t] - top);
      total += p[t];
    }
    const float inv = 1.f / total;
#pragma omp simd
    for (int64_t t = 0; t < length; ++t) p[t] *= inv;
  }
  std::fill(acc, acc + g * hd, 0.f);
  for (int64_t t = 0; t < length; ++t) {
    Row<S, C>::load(rows[t] + s.half_bytes, hd, row);
    for (int64_t j = 0; j < g; ++j) {
      const float w = scores[j * length + t];
      float* a = acc + j * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) a[d] += w * row[d];
    }
  }
  for (int64_t i = 0; i < g * hd; ++i) out[i] = static_cast<C>(acc[i]);
}

// Calls attend(head offset, context rows, length, scores) for the (sequence, KV head) pairs [begin, end)
// (pair i: sequence i / nkv, KV head i % nkv), with scratch sized for the longest of them.
template <typename Attend>
inline void for_each_pair(const uint8_t* cache, const int64_t* tables, const int64_t* lens, const Shape& s,
                          int64_t begin, int64_t end, Attend attend) {
  int64_t longest = 0;
  for (int64_t i = begin; i < end; ++i) longest = std::max(longest, lens[i / s.nkv]);
  std::vector<float> scores(s.group * longest);
  std::vector<const uint8_t*> rows(longest);
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / s.nkv, kvh = i % s.nkv;
    context_rows(cache, tables + b * s.max_blocks, lens[b], kvh, s, rows.data());
    attend((b * s.nkv + kvh) * s.group * s.hd, rows.data(), lens[b], scores.data());
  }
}

template <typename S, typename C>
inline void attend_range(const C* q, const uint8_t* cache, const int64_t* tables, const int64_t* lens,
                         const Shape& s, C* out, int64_t begin, int64_t end) {
  for_each_pair(cache, tables, lens, s, begin, end,
                [&](int64_t head, const uint8_t* const* rows, int64_t length, float* scores) {
                  attend_pair<S, C>(q + head, rows, length, s, scores, out + head);
                });
}

// The AVX-512 path (head_dim a multiple of 16), written with intrinsics: GCC's vectorizer left the
// portable loops above mostly scalar (reductions over stack arrays, loops it would not nest). Rows are
// converted to float32 into a buffer, the dot products and the weighted sum use FMA, 2^n comes from
// scalef (exact underflow to 0). A CPU without AVX-512 (or a one-ISA build) runs the portable variants.
#if !defined(INFERSTACK_ISA_AVX2) && !defined(INFERSTACK_ISA_BASELINE)
#define HAVE_AVX512_PATH 1
#define AVX512 __attribute__((target("avx512f")))

AVX512 inline __m512 round_vec_bf16(__m512 v) {   // to the nearest bf16, ties to even (NaN not special-cased)
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// 16 elements of a plain row (float32, bf16 or fp16 storage) as float32, rounded to C as KVFormat.decode rounds.
template <typename S, typename C>
AVX512 inline __m512 load16(const S* x) {
  __m512 v;
  if constexpr (std::is_same_v<S, float>) {
    v = _mm512_loadu_ps(x);
  } else if constexpr (std::is_same_v<S, bf16>) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
    v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  } else {
    v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  if constexpr (std::is_same_v<S, float> && std::is_same_v<C, bf16>) v = round_vec_bf16(v);
  if constexpr (std::is_same_v<S, float> && std::is_same_v<C, half>) {
    v = _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return v;
}

template <typename S>
constexpr bool kCodes = std::is_same_v<S, Int8Codes> || std::is_same_v<S, Fp8Codes>;

template <typename S, typename C>
AVX512 inline void load_row16(const uint8_t* p, int64_t hd, float* dst) {
  if constexpr (kCodes<S>) {
    Row<S, C>::load(p, hd, dst);
  } else {
    for (int64_t d = 0; d < hd; d += 16) _mm512_storeu_ps(dst + d, load16<S, C>(reinterpret_cast<const S*>(p) + d));
  }
}

// r[i] = the sum of v[i]'s 16 lanes, for 16 vectors: two rounds of 128-bit lane pairing, then a 4x4
// transpose-add within lanes, then the positions put in order (lane k, slot m held position 4m + k).
AVX512 inline __m512 sum16(__m512* v) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i) {
    pairs[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {
    quads[i] = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(pairs[2 * i], pairs[2 * i + 1], 0xDD));
  }
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(quads[0], quads[1]), _mm512_unpackhi_ps(quads[0], quads[1]));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(quads[2], quads[3]), _mm512_unpackhi_ps(quads[2], quads[3]));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

AVX512 inline __m512 exp512(__m512 x) {   // exp_nonpositive's polynomial, 16 lanes
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// softmax over one query head's scores, in place.
AVX512 inline void softmax16(float* p, int64_t length) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < length; t += 16) {
    const __mmask16 m = length - t >= 16 ? 0xffff : static_cast<__mmask16>((1u << (length - t)) - 1);
    top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, p + t));
  }
  const __m512 top_all = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; t += 16) {
    const __mmask16 m = length - t >= 16 ? 0xffff : static_cast<__mmask16>((1u << (length - t)) - 1);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p + t), top_all));
    total = _mm512_mask_add_ps(total, m, total, e);
    _mm512_mask_storeu_ps(p + t, m, e);
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t t = 0; t < length; t += 16) {
    const __mmask16 m = length - t >= 16 ? 0xffff : static_cast<__mmask16>((1u << (length - t)) - 1);
    _mm512_mask_storeu_ps(p + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p + t), inv));
  }
}

template <typename S, typename C>
AVX512 void attend_pair16(const C* q, const uint8_t* const* rows, int64_t length, const Shape& s, float* scores,
                          C* out) {
  const int64_t hd = s.hd, g = s.group, chunks = hd / 16;
  alignas(64) float qf[kMaxGroup * kMaxHeadDim];
  alignas(64) float row[kMaxHeadDim];
  __m512 acc[kMaxGroup * kMaxHeadDim / 16];
  for (int64_t i = 0; i < g * hd; ++i) qf[i] = static_cast<float>(q[i]);
  for (int64_t t = 0; t < length; ++t) {
    load_row16<S, C>(rows[t], hd, row);
    for (int64_t j = 0; j < g; ++j) {
      __m512 dot = _mm512_mul_ps(_mm512_load_ps(qf + j * hd), _mm512_load_ps(row));
      for (int64_t c = 1; c < chunks; ++c) {
        dot = _mm512_fmadd_ps(_mm512_load_ps(qf + j * hd + 16 * c), _mm512_load_ps(row + 16 * c), dot);
      }
      scores[j * length + t] = _mm512_reduce_add_ps(dot) * s.scale;
    }
  }
  for (int64_t j = 0; j < g; ++j) softmax16(scores + j * length, length);
  for (int64_t i = 0; i < g * chunks; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    load_row16<S, C>(rows[t] + s.half_bytes, hd, row);
    for (int64_t j = 0; j < g; ++j) {
      const __m512 w = _mm512_set1_ps(scores[j * length + t]);
      for (int64_t c = 0; c < chunks; ++c) {
        acc[j * chunks + c] = _mm512_fmadd_ps(w, _mm512_load_ps(row + 16 * c), acc[j * chunks + c]);
      }
    }
  }
  for (int64_t i = 0; i < g * chunks; ++i) _mm512_store_ps(qf + 16 * i, acc[i]);
  for (int64_t i = 0; i < g * hd; ++i) out[i] = static_cast<C>(qf[i]);
}

// JT query heads of one KV head with head_dim 16 * CH, plain rows: the queries and the weighted sums stay
// in registers, and the scores of 16 positions are reduced together (sum16) instead of one by one.
template <typename S, typename C, int JT, int CH>
AVX512 void attend_tile(const C* q, const uint8_t* const* rows, int64_t length, const Shape& s, float* scores,
                        C* out) {
  constexpr int64_t hd = 16 * CH;
  alignas(64) float buf[JT * hd];
  __m512 qv[JT][CH], acc[JT][CH], parts[JT][16];
  for (int64_t i = 0; i < JT * hd; ++i) buf[i] = static_cast<float>(q[i]);
  for (int j = 0; j < JT; ++j)
    for (int c = 0; c < CH; ++c) qv[j][c] = _mm512_load_ps(buf + j * hd + 16 * c);
  const __m512 scale = _mm512_set1_ps(s.scale);
  for (int64_t t0 = 0; t0 < length; t0 += 16) {
    const int64_t n = std::min<int64_t>(16, length - t0);
    for (int64_t u = 0; u < 16; ++u) {
      if (u >= n) {
        for (int j = 0; j < JT; ++j) parts[j][u] = _mm512_setzero_ps();
        continue;
      }
      const S* k = reinterpret_cast<const S*>(rows[t0 + u]);
      __m512 kv[CH];
      for (int c = 0; c < CH; ++c) kv[c] = load16<S, C>(k + 16 * c);
      for (int j = 0; j < JT; ++j) {
        __m512 dot = _mm512_mul_ps(qv[j][0], kv[0]);
        for (int c = 1; c < CH; ++c) dot = _mm512_fmadd_ps(qv[j][c], kv[c], dot);
        parts[j][u] = dot;
      }
    }
    const __mmask16 m = n == 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
    for (int j = 0; j < JT; ++j) _mm512_mask_storeu_ps(scores + j * length + t0, m, _mm512_mul_ps(sum16(parts[j]), scale));
  }
  for (int j = 0; j < JT; ++j) softmax16(scores + j * length, length);
  for (int j = 0; j < JT; ++j)
    for (int c = 0; c < CH; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t t = 0; t < length; ++t) {
    const S* v = reinterpret_cast<const S*>(rows[t] + s.half_bytes);
    __m512 vv[CH];
    for (int c = 0; c < CH; ++c) vv[c] = load16<S, C>(v + 16 * c);
    for (int j = 0; j < JT; ++j) {
      const __m512 w = _mm512_set1_ps(scores[j * length + t]);
      for (int c = 0; c < CH; ++c) acc[j][c] = _mm512_fmadd_ps(w, vv[c], acc[j][c]);
    }
  }
  for (int j = 0; j < JT; ++j)
    for (int c = 0; c < CH; ++c) _mm512_store_ps(buf + j * hd + 16 * c, acc[j][c]);
  for (int64_t i = 0; i < JT * hd; ++i) out[i] = static_cast<C>(buf[i]);
}

// A KV head's group in tiles of up to four query heads (head_dim 64 or 128).
template <typename S, typename C, int CH>
AVX512 void attend_tiles(const C* q, const uint8_t* const* rows, int64_t length, const Shape& s, float* scores,
                         C* out) {
  for (int64_t j0 = 0; j0 < s.group; j0 += 4) {
    const int64_t off = j0 * s.hd;
    switch (std::min<int64_t>(4, s.group - j0)) {
      case 1: attend_tile<S, C, 1, CH>(q + off, rows, length, s, scores, out + off); break;
      case 2: attend_tile<S, C, 2, CH>(q + off, rows, length, s, scores, out + off); break;
      case 3: attend_tile<S, C, 3, CH>(q + off, rows, length, s, scores, out + off); break;
      default: attend_tile<S, C, 4, CH>(q + off, rows, length, s, scores, out + off); break;
    }
  }
}

template <typename S, typename C>
AVX512 void attend_range16(const C* q, const uint8_t* cache, const int64_t* tables, const int64_t* lens,
                           const Shape& s, C* out, int64_t begin, int64_t end) {
  for_each_pair(cache, tables, lens, s, begin, end,
                [&](int64_t head, const uint8_t* const* rows, int64_t length, float* scores) {
                  if constexpr (!kCodes<S>) {
                    if (s.hd == 64) return attend_tiles<S, C, 4>(q + head, rows, length, s, scores, out + head);
                    if (s.hd == 128) return attend_tiles<S, C, 8>(q + head, rows, length, s, scores, out + head);
                  }
                  attend_pair16<S, C>(q + head, rows, length, s, scores, out + head);
                });
}
#endif

// The portable loops' vector variants, as in decode_layers.cpp: target_clones for AVX-512, AVX2 and the
// baseline picked at load time; a one-ISA build (extension.py, INFERSTACK_DECODE_ISA) compiles only the
// variant such a CPU runs. The templates above are inlined into each clone and compiled for its target.
#if defined(INFERSTACK_ISA_AVX2)
#define ATTN_CLONES __attribute__((target("avx2"), noinline))
#elif defined(INFERSTACK_ISA_BASELINE)
#define ATTN_CLONES __attribute__((noinline))
#else
#define ATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

#define ATTN_VARIANT(NAME, S, C)                                                                      \
  ATTN_CLONES void NAME(const C* q, const uint8_t* cache, const int64_t* tables, const int64_t* lens, \
                        const Shape& s, C* out, int64_t begin, int64_t end) {                          \
    attend_range<S, C>(q, cache, tables, lens, s, out, begin, end);                                    \
  }

ATTN_VARIANT(attend_f32_f32, float, float)
ATTN_VARIANT(attend_bf16_bf16, bf16, bf16)
ATTN_VARIANT(attend_f16_f16, half, half)
ATTN_VARIANT(attend_f32_bf16, float, bf16)
ATTN_VARIANT(attend_f32_f16, float, half)
ATTN_VARIANT(attend_int8_f32, Int8Codes, float)
ATTN_VARIANT(attend_int8_bf16, Int8Codes, bf16)
ATTN_VARIANT(attend_int8_f16, Int8Codes, half)
ATTN_VARIANT(attend_fp8_f32, Fp8Codes, float)
ATTN_VARIANT(attend_fp8_bf16, Fp8Codes, bf16)
ATTN_VARIANT(attend_fp8_f16, Fp8Codes, half)

template <typename C>
using Variant = void (*)(const C*, const uint8_t*, const int64_t*, const int64_t*, const Shape&, C*, int64_t,
                         int64_t);

// The variant for a cache storage (plain dtype, or "int8" / "fp8_e4m3" codes) and query dtype C; nullptr
// for a pair the torch path alone covers.
template <typename C>
Variant<C> pick(at::ScalarType storage, const std::string& codes);

template <>
Variant<float> pick<float>(at::ScalarType storage, const std::string& codes) {
  if (codes == "int8") return attend_int8_f32;
  if (codes == "fp8_e4m3") return attend_fp8_f32;
  return storage == at::kFloat ? attend_f32_f32 : nullptr;
}
template <>
Variant<bf16> pick<bf16>(at::ScalarType storage, const std::string& codes) {
  if (codes == "int8") return attend_int8_bf16;
  if (codes == "fp8_e4m3") return attend_fp8_bf16;
  if (storage == at::kBFloat16) return attend_bf16_bf16;
  return storage == at::kFloat ? attend_f32_bf16 : nullptr;
}
template <>
Variant<half> pick<half>(at::ScalarType storage, const std::string& codes) {
  if (codes == "int8") return attend_int8_f16;
  if (codes == "fp8_e4m3") return attend_fp8_f16;
  if (storage == at::kHalf) return attend_f16_f16;
  return storage == at::kFloat ? attend_f32_f16 : nullptr;
}

// The AVX-512 variant for the same pair, or nullptr where the portable one runs.
template <typename S, typename C>
Variant<C> fast() {
#if defined(HAVE_AVX512_PATH)
  return attend_range16<S, C>;
#else
  return nullptr;
#endif
}

template <typename C>
Variant<C> pick_fast(at::ScalarType storage, const std::string& codes) {
  if (codes == "int8") return fast<Int8Codes, C>();
  if (codes == "fp8_e4m3") return fast<Fp8Codes, C>();
  if (storage == at::kFloat) return fast<float, C>();
  if constexpr (!std::is_same_v<C, float>) {
    if (storage == c10::CppTypeToScalarType<C>::value) return fast<C, C>();
  }
  return nullptr;
}

bool use_fast(int64_t hd) {
#if defined(HAVE_AVX512_PATH)
  return hd % 16 == 0 && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

template <typename C>
void run(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables, const at::Tensor& lens,
         const std::string& codes, const Shape& s, at::Tensor& out) {
  Variant<C> fn = pick<C>(cache.scalar_type(), codes);
  if (fn != nullptr && use_fast(s.hd)) fn = pick_fast<C>(cache.scalar_type(), codes);
  TORCH_CHECK(fn != nullptr, "paged_decode_attention: no kernel for this cache and query dtype");
  const C* qp = q.data_ptr<C>();
  const auto* cp = static_cast<const uint8_t*>(cache.data_ptr());
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  C* op = out.data_ptr<C>();
  const int64_t pairs = q.size(0) * s.nkv;
  // ~8k context rows per task: a short batch runs inline instead of waking the pool.
  const int64_t longest = std::max<int64_t>(1, lens.max().item<int64_t>());
  const int64_t grain = std::max<int64_t>(1, 8192 / longest);
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) { fn(qp, cp, tp, lp, s, op, begin, end); });
}

}  // namespace

// Decode attention of ``q [B, nh, hd]`` (one new token per sequence, its K/V already in the cache) over
// ``kv_cache [2, blocks, block_size, nkv, row]``: sequence b's context is its first ``seq_lens[b]``
// positions, found through ``block_tables [B, max_blocks]``. ``codes`` is "" for a plain cache, else the
// quantized format's name ("int8", "fp8_e4m3": rows of head_dim codes and a float32 scale). Returns
// [B, nh, hd] in q's dtype.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, const std::string& codes) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.device().is_cpu(), "paged_decode_attention: q [B, nh, hd]");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.size(0) == 2,
              "paged_decode_attention: kv_cache [2, blocks, block_size, nkv, row], contiguous");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  block_tables.size(0) == q.size(0),
              "paged_decode_attention: block_tables [B, max_blocks] int64");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous() &&
                  seq_lens.size(0) == q.size(0),
              "paged_decode_attention: seq_lens [B] int64");
  const int64_t nh = q.size(1), hd = q.size(2), nkv = kv_cache.size(3), row = kv_cache.size(4);
  const bool quantized = !codes.empty();
  TORCH_CHECK(!quantized || (codes == "int8" || codes == "fp8_e4m3"), "paged_decode_attention: unknown codes");
  TORCH_CHECK(quantized ? (kv_cache.scalar_type() == at::kByte && row == hd + 4) : row == hd,
              "paged_decode_attention: the cache row does not match head_dim and the format");
  TORCH_CHECK(hd <= kMaxHeadDim && nh % nkv == 0 && nh / nkv <= kMaxGroup,
              "paged_decode_attention: head_dim up to 256 and up to 16 query heads per KV head");
  const int64_t block_size = kv_cache.size(2);
  if (q.size(0) > 0) {
    const int64_t longest = seq_lens.max().item<int64_t>(), shortest = seq_lens.min().item<int64_t>();
    TORCH_CHECK(shortest > 0 && longest <= block_tables.size(1) * block_size,
                "paged_decode_attention: every length must be in 1..max_blocks * block_size");
  }
  const int64_t row_bytes = row * kv_cache.element_size();
  Shape s{nh, nkv, hd, nh / nkv, block_size, block_tables.size(1), row_bytes,
          kv_cache.numel() / 2 * kv_cache.element_size(), static_cast<float>(scale)};
  at::Tensor out = at::empty_like(q);
  if (q.size(0) == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, kv_cache, block_tables, seq_lens, codes, s, out); break;
    case at::kBFloat16: run<bf16>(q, kv_cache, block_tables, seq_lens, codes, s, out); break;
    case at::kHalf: run<half>(q, kv_cache, block_tables, seq_lens, codes, s, out); break;
    default: TORCH_CHECK(false, "paged_decode_attention: q must be float32, bfloat16 or float16");
  }
  return out;
}
