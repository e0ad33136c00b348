// Decode attention for many sequences at once, read in place from the paged KV cache
// (engine/executor/attention.py, ``_decode``).
//
// The torch path gathers every decode sequence's context through the block tables into a padded
// [B, kv_heads, L, head_dim] copy and attends over it with two matmuls or SDPA; at 64 sequences x 256
// tokens the copy is ~7-12 MB per layer, more than the attention's arithmetic. Here each sequence's rows
// are read where they lie: slot = table[t / block_size] * block_size + t % block_size. All query heads of a
// KV head's group share each key and value row once it is converted to float32. The AVX-512 path takes a
// whole sequence (all its KV heads) per unit of work and walks its blocks in tiles of 16 positions, so
// each block is read front to back once per pass; at 64 sequences x ~190 positions it moves ~9 MB of bf16
// K/V per layer (4.9 MB as int8), and is bound by that traffic more than by its arithmetic.
//
// Numerics: scores, softmax and the weighted sum in float32 (two passes: scores, then values), one
// rounding to the query dtype at the end. Plain rows are read as KVFormat.decode reads them (a float32
// cache rounded to the query dtype). A quantized row (int8 / fp8_e4m3 codes and a float32 scale,
// executor/kv_format.py) is attended as code x scale in float32, not rounded to the query dtype first as
// the torch path's KVFormat.decode rounds it: at most half a unit of bf16's last place finer per value.
// The AVX-512 path applies an int8 row's scale to the whole dot product and softmax weight instead of to
// each element. The exponential is a Cephes-style polynomial (~2 float32 ulp) written so the compiler
// vectorizes it; SDPA's softmax uses its own vector exp of the same accuracy.
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

// One cache row -> head_dim floats: a plain row rounded to C (the query dtype) as KVFormat.decode rounds,
// a quantized one as code x scale in float32.
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
    for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<float>(x[d]) * scale;
  }
};

template <typename C>
struct Row<Fp8Codes, C> {
  static inline void load(const uint8_t* p, int64_t hd, float* dst) {
    float scale;
    std::memcpy(&scale, p + hd, sizeof(float));
    const c10::Float8_e4m3fn* x = reinterpret_cast<const c10::Float8_e4m3fn*>(p);
    for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<float>(x[d]) * scale;
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
  int64_t unit_heads;   // KV heads per work unit: all of a sequence's, or one where too few sequences to share
  float scale;
};

// The key rows of KV head 0 at one sequence's first ``length`` positions, block by block (no division per
// position); KV head h's row lies h * row_bytes further, its value rows half_bytes further.
inline void context_rows(const uint8_t* cache, const int64_t* table, int64_t length, const Shape& s,
                         const uint8_t** rows) {
  const int64_t step = s.nkv * s.row_bytes;
  for (int64_t start = 0, blk = 0; start < length; start += s.block_size, ++blk) {
    const uint8_t* row = cache + table[blk] * s.block_size * step;
    for (int64_t t = start; t < std::min(length, start + s.block_size); ++t, row += step) rows[t] = row;
  }
}

// One (sequence, KV head): every query head of the group against the context's rows in the cache, each
// ``off`` bytes into its position's rows. ``scores`` holds group * length floats.
template <typename S, typename C>
inline void attend_pair(const C* q, const uint8_t* const* rows, int64_t off, int64_t length, const Shape& s,
                        float* scores, C* out) {
  const int64_t hd = s.hd, g = s.group;
  float qf[kMaxGroup * kMaxHeadDim];
  float row[kMaxHeadDim];
  float acc[kMaxGroup * kMaxHeadDim];
  for (int64_t i = 0; i < g * hd; ++i) qf[i] = static_cast<float>(q[i]);
  for (int64_t t = 0; t < length; ++t) {
    Row<S, C>::load(rows[t] + off, hd, row);
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
    Row<S, C>::load(rows[t] + off + s.half_bytes, hd, row);
    for (int64_t j = 0; j < g; ++j) {
      const float w = scores[j * length + t];
      float* a = acc + j * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) a[d] += w * row[d];
    }
  }
  for (int64_t i = 0; i < g * hd; ++i) out[i] = static_cast<C>(acc[i]);
}

// Calls attend(sequence, first KV head, context rows, length, scores) for the work units [begin, end) (unit i:
// sequence i / units per sequence, KV heads from (i % units per sequence) * unit_heads), with scratch sized
// for the longest of them.
struct Scratch {
  float* scores;   // unit_heads * group * length
  float* qf;       // unit_heads * group * head_dim: the queries as float32
  float* acc;      // the same: the weighted sums
};

template <typename Attend>
inline void for_each_unit(const uint8_t* cache, const int64_t* tables, const int64_t* lens, const Shape& s,
                          int64_t begin, int64_t end, Attend attend) {
  const int64_t per_seq = s.nkv / s.unit_heads, heads = s.unit_heads * s.group;
  int64_t longest = 0;
  for (int64_t i = begin; i < end; ++i) longest = std::max(longest, lens[i / per_seq]);
  std::vector<float> buffer(heads * (longest + 2 * s.hd));
  Scratch scratch{buffer.data(), buffer.data() + heads * longest, buffer.data() + heads * (longest + s.hd)};
  std::vector<const uint8_t*> rows(longest);
  for (int64_t i = begin, filled = -1; i < end; ++i) {
    const int64_t b = i / per_seq;
    if (b != filled) context_rows(cache, tables + b * s.max_blocks, lens[b], s, rows.data());
    filled = b;
    attend(b, (i % per_seq) * s.unit_heads, rows.data(), lens[b], scratch);
  }
}

template <typename S, typename C>
inline void attend_range(const C* q, const uint8_t* cache, const int64_t* tables, const int64_t* lens,
                         const Shape& s, C* out, int64_t begin, int64_t end) {
  for_each_unit(cache, tables, lens, s, begin, end,
                [&](int64_t b, int64_t h0, const uint8_t* const* rows, int64_t length, Scratch& w) {
                  for (int64_t h = h0; h < h0 + s.unit_heads; ++h) {
                    const int64_t head = (b * s.nkv + h) * s.group * s.hd;
                    attend_pair<S, C>(q + head, rows, h * s.row_bytes, length, s, w.scores, out + head);
                  }
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

template <typename C>
AVX512 inline __m512 round_vec(__m512 v) {   // float32 values rounded to C as KVFormat.decode rounds
  if constexpr (std::is_same_v<C, bf16>) return round_vec_bf16(v);
  if constexpr (std::is_same_v<C, half>) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return v;
}

// 16 elements of a plain row (float32, bf16 or fp16 storage) as float32, rounded to C as KVFormat.decode rounds.
template <typename S, typename C>
AVX512 inline __m512 load16(const S* x) {
  if constexpr (std::is_same_v<S, float>) return round_vec<C>(_mm512_loadu_ps(x));
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  if constexpr (std::is_same_v<S, bf16>) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  return _mm512_cvtph_ps(raw);
}

template <typename S>
constexpr bool kCodes = std::is_same_v<S, Int8Codes> || std::is_same_v<S, Fp8Codes>;

// bf16 rows are widened 32 elements at a time, the even elements by a shift and the odd ones by a mask (two
// ALU operations per 32, where widening 16 in order takes a shuffle and a shift each). Chunk 2k of such a
// row then holds its elements 32k + 2i and chunk 2k + 1 the elements 32k + 2i + 1; queries and weighted
// sums are kept in the same order, and put back in order once at the end.
template <typename S>
constexpr bool kSplit = std::is_same_v<S, bf16>;

// The 16 * CH elements of one row as float32 chunks: plain rows rounded to C as KVFormat.decode rounds
// them; int8 rows as their codes, with the row's scale returned (1 for a plain row) for the caller to apply
// to a whole dot product or weight: code x scale is then never rounded to C (a finer value than the torch
// path's, by at most half a unit of C's last place).
template <typename S, typename C, int CH>
AVX512 inline float load_chunks(const uint8_t* p, __m512* out) {
  if constexpr (std::is_same_v<S, Int8Codes>) {
    for (int c = 0; c < CH; ++c) {
      out[c] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p) + c)));
    }
    float scale;
    std::memcpy(&scale, p + 16 * CH, sizeof(float));
    return scale;
  } else if constexpr (kSplit<S>) {
    static_assert(CH % 2 == 0, "bf16 rows widen 32 elements at a time");
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
    for (int c = 0; c < CH; c += 2) {
      const __m512i x = _mm512_loadu_si512(p + 32 * c);
      out[c] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      out[c + 1] = _mm512_castsi512_ps(_mm512_and_si512(x, high));
    }
  } else {
    for (int c = 0; c < CH; ++c) out[c] = load16<S, C>(reinterpret_cast<const S*>(p) + 16 * c);
  }
  return 1.f;
}

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
AVX512 void attend_pair16(const C* q, const uint8_t* const* rows, int64_t off, int64_t length, const Shape& s,
                          float* scores, C* out) {
  const int64_t hd = s.hd, g = s.group, chunks = hd / 16;
  alignas(64) float qf[kMaxGroup * kMaxHeadDim];
  alignas(64) float row[kMaxHeadDim];
  __m512 acc[kMaxGroup * kMaxHeadDim / 16];
  for (int64_t i = 0; i < g * hd; ++i) qf[i] = static_cast<float>(q[i]);
  for (int64_t t = 0; t < length; ++t) {
    load_row16<S, C>(rows[t] + off, hd, row);
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
    load_row16<S, C>(rows[t] + off + s.half_bytes, hd, row);
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

// The scores of JT query heads (qf: JT * 16 * CH floats, in load_chunks' order) at the n <= 16 positions
// from t0, one KV head's rows ``off`` bytes into each position's: 16 positions' dot products are reduced
// together (sum16).
template <typename S, typename C, int JT, int CH>
AVX512 void score_tile(const float* qf, const uint8_t* const* rows, int64_t off, int64_t t0, int64_t n, float scale,
                       float* scores, int64_t length) {
  constexpr int64_t hd = 16 * CH;
  __m512 qv[JT][CH], parts[JT][16];
  alignas(64) float row_scale[16];
  for (int j = 0; j < JT; ++j)
    for (int c = 0; c < CH; ++c) qv[j][c] = _mm512_loadu_ps(qf + j * hd + 16 * c);
  for (int64_t u = 0; u < 16; ++u) {
    if (u >= n) {
      for (int j = 0; j < JT; ++j) parts[j][u] = _mm512_setzero_ps();
      row_scale[u] = 0.f;
      continue;
    }
    __m512 kv[CH];
    row_scale[u] = load_chunks<S, C, CH>(rows[t0 + u] + off, kv) * scale;
    for (int j = 0; j < JT; ++j) {
      __m512 dot = _mm512_mul_ps(qv[j][0], kv[0]);
      for (int c = 1; c < CH; ++c) dot = _mm512_fmadd_ps(qv[j][c], kv[c], dot);
      parts[j][u] = dot;
    }
  }
  const __mmask16 m = n == 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
  const __m512 sv = _mm512_load_ps(row_scale);
  for (int j = 0; j < JT; ++j) _mm512_mask_storeu_ps(scores + j * length + t0, m, _mm512_mul_ps(sum16(parts[j]), sv));
}

// acc (JT * 16 * CH floats) += the softmax weights of JT query heads times one KV head's value rows at the
// n <= 16 positions from t0 (``off`` bytes into each position's value rows).
template <typename S, typename C, int JT, int CH>
AVX512 void value_tile(const float* weights, int64_t length, const uint8_t* const* rows, int64_t off, int64_t t0,
                       int64_t n, float* acc) {
  constexpr int64_t hd = 16 * CH;
  __m512 a[JT][CH];
  for (int j = 0; j < JT; ++j)
    for (int c = 0; c < CH; ++c) a[j][c] = _mm512_loadu_ps(acc + j * hd + 16 * c);
  for (int64_t t = t0; t < t0 + n; ++t) {
    __m512 vv[CH];
    const float row_scale = load_chunks<S, C, CH>(rows[t] + off, vv);
    for (int j = 0; j < JT; ++j) {
      const __m512 w = _mm512_set1_ps(weights[j * length + t] * row_scale);
      for (int c = 0; c < CH; ++c) a[j][c] = _mm512_fmadd_ps(w, vv[c], a[j][c]);
    }
  }
  for (int j = 0; j < JT; ++j)
    for (int c = 0; c < CH; ++c) _mm512_storeu_ps(acc + j * hd + 16 * c, a[j][c]);
}

template <typename S, typename C, int JT, int CH, bool Values>
AVX512 inline void group_tile(const float* qf, const uint8_t* const* rows, int64_t off, int64_t t0, int64_t n,
                              int64_t length, float scale, float* scores, float* acc) {
  if constexpr (Values) {
    value_tile<S, C, JT, CH>(scores, length, rows, off, t0, n, acc);
  } else {
    score_tile<S, C, JT, CH>(qf, rows, off, t0, n, scale, scores, length);
  }
}

// One tile of positions for every KV head of the unit (scores, or with Values the weighted sums), each
// KV head's group in tiles of up to four query heads.
template <typename S, typename C, int CH, bool Values>
AVX512 void unit_tile(const float* qf, const uint8_t* const* rows, int64_t off, int64_t t0, int64_t length,
                      const Shape& s, float* scores, float* acc) {
  constexpr int64_t hd = 16 * CH;
  const int64_t n = std::min<int64_t>(16, length - t0);
  for (int64_t h = 0; h < s.unit_heads; ++h) {
    const int64_t row_off = off + h * s.row_bytes;
    for (int64_t j0 = 0; j0 < s.group; j0 += 4) {
      const int64_t head = h * s.group + j0;
      const float* qj = qf + head * hd;
      float* sc = scores + head * length;
      float* a = acc + head * hd;
      switch (std::min<int64_t>(4, s.group - j0)) {
        case 1: group_tile<S, C, 1, CH, Values>(qj, rows, row_off, t0, n, length, s.scale, sc, a); break;
        case 2: group_tile<S, C, 2, CH, Values>(qj, rows, row_off, t0, n, length, s.scale, sc, a); break;
        case 3: group_tile<S, C, 3, CH, Values>(qj, rows, row_off, t0, n, length, s.scale, sc, a); break;
        default: group_tile<S, C, 4, CH, Values>(qj, rows, row_off, t0, n, length, s.scale, sc, a); break;
      }
    }
  }
}

// Puts ``count`` floats in load_chunks' split order (pairs of chunks: even, then odd elements) back in order.
AVX512 inline void unsplit(float* x, int64_t count) {
  const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t i = 0; i < count; i += 32) {
    const __m512 even = _mm512_loadu_ps(x + i), odd = _mm512_loadu_ps(x + i + 16);
    _mm512_storeu_ps(x + i, _mm512_permutex2var_ps(even, low, odd));
    _mm512_storeu_ps(x + i + 16, _mm512_permutex2var_ps(even, high, odd));
  }
}

// Every KV head of a work unit (head_dim 64 or 128, plain or int8 rows), its query heads and outputs from q
// and out: two passes (scores, then values) over the context in tiles of 16 positions, each tile's rows of
// all the unit's KV heads together (they are adjacent in the cache). (Prefetching the next tile in software
// measured no faster: the hardware prefetcher follows a block read front to back.)
template <typename S, typename C, int CH>
AVX512 void attend_unit(const C* q, const uint8_t* const* rows, int64_t h0, int64_t length, const Shape& s,
                        Scratch& w, C* out) {
  const int64_t heads = s.unit_heads * s.group, off = h0 * s.row_bytes;
  if constexpr (kSplit<S>) {
    static_assert(std::is_same_v<C, S>, "a bf16 cache is read with bf16 queries");
    for (int64_t i = 0; i < heads; ++i) {
      __m512 qc[CH];
      load_chunks<S, C, CH>(reinterpret_cast<const uint8_t*>(q + i * s.hd), qc);
      for (int c = 0; c < CH; ++c) _mm512_storeu_ps(w.qf + i * s.hd + 16 * c, qc[c]);
    }
  } else {
    for (int64_t i = 0; i < heads * s.hd; ++i) w.qf[i] = static_cast<float>(q[i]);
  }
  std::fill(w.acc, w.acc + heads * s.hd, 0.f);
  for (int64_t t0 = 0; t0 < length; t0 += 16) {
    unit_tile<S, C, CH, false>(w.qf, rows, off, t0, length, s, w.scores, w.acc);
  }
  for (int64_t i = 0; i < heads; ++i) softmax16(w.scores + i * length, length);
  for (int64_t t0 = 0; t0 < length; t0 += 16) {
    unit_tile<S, C, CH, true>(w.qf, rows, off + s.half_bytes, t0, length, s, w.scores, w.acc);
  }
  if constexpr (kSplit<S>) unsplit(w.acc, heads * s.hd);
  for (int64_t i = 0; i < heads * s.hd; ++i) out[i] = static_cast<C>(w.acc[i]);
}

template <typename S, typename C>
AVX512 void attend_range16(const C* q, const uint8_t* cache, const int64_t* tables, const int64_t* lens,
                           const Shape& s, C* out, int64_t begin, int64_t end) {
  for_each_unit(cache, tables, lens, s, begin, end,
                [&](int64_t b, int64_t h0, const uint8_t* const* rows, int64_t length, Scratch& w) {
                  const int64_t head = (b * s.nkv + h0) * s.group * s.hd;
                  if constexpr (!std::is_same_v<S, Fp8Codes>) {
                    if (s.hd == 64) return attend_unit<S, C, 4>(q + head, rows, h0, length, s, w, out + head);
                    if (s.hd == 128) return attend_unit<S, C, 8>(q + head, rows, h0, length, s, w, out + head);
                  }
                  for (int64_t h = 0; h < s.unit_heads; ++h) {
                    const int64_t at = head + h * s.group * s.hd;
                    attend_pair16<S, C>(q + at, rows, (h0 + h) * s.row_bytes, length, s, w.scores, out + at);
                  }
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
         const std::string& codes, Shape s, at::Tensor& out) {
  Variant<C> fn = pick<C>(cache.scalar_type(), codes);
  if (fn != nullptr && use_fast(s.hd)) fn = pick_fast<C>(cache.scalar_type(), codes);
  TORCH_CHECK(fn != nullptr, "paged_decode_attention: no kernel for this cache and query dtype");
  const C* qp = q.data_ptr<C>();
  const auto* cp = static_cast<const uint8_t*>(cache.data_ptr());
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  C* op = out.data_ptr<C>();
  // A unit of work is a whole sequence (each cache block read front to back once per pass) where there are
  // enough sequences to share out, else one (sequence, KV head) pair, so a short batch still uses every thread.
  s.unit_heads = q.size(0) >= 4 * at::get_num_threads() ? s.nkv : 1;
  const int64_t units = q.size(0) * (s.nkv / s.unit_heads);
  // ~8k context rows per task: a short batch runs inline instead of waking the pool.
  const int64_t longest = std::max<int64_t>(1, lens.max().item<int64_t>());
  const int64_t grain = std::max<int64_t>(1, 8192 / (longest * s.unit_heads));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) { fn(qp, cp, tp, lp, s, op, begin, end); });
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
          kv_cache.numel() / 2 * kv_cache.element_size(), nkv, static_cast<float>(scale)};
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
