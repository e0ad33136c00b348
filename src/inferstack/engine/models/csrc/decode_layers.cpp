// The decoder layers of one batch-1 decode step in C++ (engine/models/fused_decode.py).
//
// The Python layer loop (models/llama.py, layers.py, quant_linear.py, executor/attention.py) for its
// int4, bf16-KV, float32-stream case: the int4 matmuls are the same ATen calls with the same arguments;
// everything between them is plain loops over buffers reused by every layer of the step, so one layer
// is four ATen dispatches instead of ~15 (and ~40 Python ops before this file existed):
//
// * RMS norm: sum of squares in double (torch sums float32 in its own order: the statistic differs in
//   the last float32 bits), then the two multiplies and the bf16 rounding where torch rounds;
// * rotary and the cache write: rounded as torch rounds ``x * cos + cat(x2, x1) * signed_sin``;
// * attention straight from the paged cache through the context's slots, float32 scores, softmax and
//   weighted sum, one bf16 rounding at the end (SDPA's CPU kernel, with the gather copy before it,
//   cost more than an int4 matmul per layer at batch 1 on a short context);
// * SiLU(gate) * up and the residual adds, rounded as torch's bf16 ops round.
//
// So the result is the Python loop's to rounding, not bit for bit (the differences grow to bf16-activation
// noise over 30 layers): the test compares greedy tokens and logits within a tolerance. -ffp-contract=off
// keeps the element-wise roundings torch's.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>   // at::Tensor <-> torch.Tensor; lighter than torch/extension.h

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

using bf16 = at::BFloat16;

struct Step {
  const float* cos;                    // [head_dim] rotary rows of this token: cos | cos
  const float* sin;                    // -sin | sin
  int64_t slot;                        // cache slot of the new token
  const int64_t* slots;                // the context's cache slots, the new token's included
  int64_t length;                      // how many
  at::Tensor h, q, attn, act;          // bf16 buffers every layer reuses: norm out, q, attention out, MLP act
  std::vector<float> scores;           // [length] one head's attention weights
  std::vector<float> acc;              // [head_dim] one head's weighted sum of values
  int64_t nh, nkv, hd, inter;
  double eps;
  float scale;
};

// layers.rms_norm(x, weight, eps, out_dtype=bfloat16) for a float32 stream: ``x * r`` then ``* weight``
// rounded to float32 each, then to bf16, as torch's two multiplies round.
void rms_norm_bf16(const float* x, const float* w, bf16* out, int64_t n, double eps) {
  double squares = 0.0;
  for (int64_t i = 0; i < n; ++i) squares += static_cast<double>(x[i]) * x[i];
  const float r = static_cast<float>(1.0 / std::sqrt(static_cast<double>(static_cast<float>(squares / n)) + eps));
  for (int64_t i = 0; i < n; ++i) {
    const float h = x[i] * r;
    out[i] = bf16(h * w[i]);
  }
}

// QuantizedLinear on its int4 kernel: bf16 in, bf16 out.
at::Tensor int4(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scales, int64_t group) {
  return at::_weight_int4pack_mm_for_cpu(x, data, group, scales);
}

// Rotary.apply on the q and k heads of ``qkv [nh + 2 nkv, hd]`` (bf16), then the cache write: rotated q
// heads go to s.q, rotated k heads and the v heads straight into the token's cache slot. Each element is
// rounded as torch rounds ``x * cos + cat(x2, x1) * signed_sin`` (three float32 roundings, no fused
// multiply-add) and then cast to bf16.
void rotary_and_write(const at::Tensor& qkv, bf16* cache, int64_t half_stride, Step& s) {
  TORCH_CHECK(qkv.is_contiguous() && qkv.scalar_type() == at::kBFloat16, "decode_layers: qkv must be bf16");
  const int64_t hd = s.hd, half = hd / 2;
  const bf16* in = qkv.data_ptr<bf16>();
  bf16* k_row = cache + s.slot * s.nkv * hd;
  bf16* v_row = k_row + half_stride;
  bf16* q = s.q.data_ptr<bf16>();
  for (int64_t h = 0; h < s.nh + s.nkv; ++h) {
    const bf16* x = in + h * hd;
    bf16* out = h < s.nh ? q + h * hd : k_row + (h - s.nh) * hd;
    for (int64_t d = 0; d < hd; ++d) {
      const float a = static_cast<float>(x[d]) * s.cos[d];
      const float b = static_cast<float>(x[d < half ? d + half : d - half]) * s.sin[d];
      out[d] = bf16(a + b);
    }
  }
  std::memcpy(v_row, in + (s.nh + s.nkv) * hd, s.nkv * hd * sizeof(bf16));
}

// The attention loops' vector variants: target_clones builds them for AVX-512, AVX2 and the baseline and
// picks one at load time, so a CPU without AVX-512 runs a clone this one never would. A build for one
// instruction set (extension.py, INFERSTACK_DECODE_ISA) compiles only the clone that CPU runs, with the
// same target options and not inlined (as a clone is not), so the tests here run that code too.
#if defined(INFERSTACK_ISA_AVX2)
#define VECTOR_CLONES __attribute__((target("avx2"), noinline))
#elif defined(INFERSTACK_ISA_BASELINE)
#define VECTOR_CLONES __attribute__((noinline))
#else
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif

// One query head against one KV head's context: scores, softmax, weighted sum (float32), bf16 out.
// The dot products are reductions the compiler may reorder only where told (omp simd).
VECTOR_CLONES
void attend_head(const bf16* q, const bf16* keys, const bf16* values, int64_t row_stride, Step& s, bf16* out) {
  const int64_t hd = s.hd;
  float qf[256];
  for (int64_t d = 0; d < hd; ++d) qf[d] = static_cast<float>(q[d]);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < s.length; ++t) {
    const bf16* k = keys + s.slots[t] * row_stride;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t d = 0; d < hd; ++d) dot += qf[d] * static_cast<float>(k[d]);
    s.scores[t] = dot * s.scale;
    top = std::max(top, s.scores[t]);
  }
  float total = 0.f;
  for (int64_t t = 0; t < s.length; ++t) {
    s.scores[t] = std::exp(s.scores[t] - top);
    total += s.scores[t];
  }
  float* acc = s.acc.data();
  std::fill(acc, acc + hd, 0.f);
  for (int64_t t = 0; t < s.length; ++t) {
    const bf16* v = values + s.slots[t] * row_stride;
    const float p = s.scores[t];
#pragma omp simd
    for (int64_t d = 0; d < hd; ++d) acc[d] += p * static_cast<float>(v[d]);
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < hd; ++d) out[d] = bf16(acc[d] * inv);
}

// _decode for one sequence over the paged cache: every query head of a KV-head group reads that KV head's
// rows in place (no gather copy); writes s.attn [1, nh * hd].
void attend(const bf16* cache, int64_t half_stride, Step& s) {
  const int64_t group = s.nh / s.nkv, row_stride = s.nkv * s.hd;
  const bf16* q = s.q.data_ptr<bf16>();
  bf16* out = s.attn.data_ptr<bf16>();
  for (int64_t h = 0; h < s.nh; ++h) {
    const bf16* keys = cache + (h / group) * s.hd;
    attend_head(q + h * s.hd, keys, keys + half_stride, row_stride, s, out + h * s.hd);
  }
}

// x += y (bf16), each sum rounded to float32 as torch's in-place add of a bf16 tensor to a float32 one.
void add_bf16(float* x, const at::Tensor& y, int64_t n) {
  const bf16* yp = y.data_ptr<bf16>();
  for (int64_t i = 0; i < n; ++i) x[i] += static_cast<float>(yp[i]);
}

// silu(gate) * up over ``gate_up [1, 2 inter]`` into s.act, rounded to bf16 after each op as torch's bf16
// silu and multiply round.
void silu_mul(const at::Tensor& gate_up, Step& s) {
  const bf16* g = gate_up.data_ptr<bf16>();
  const bf16* u = g + s.inter;
  bf16* out = s.act.data_ptr<bf16>();
  for (int64_t i = 0; i < s.inter; ++i) {
    const float x = static_cast<float>(g[i]);
    const bf16 silu(x / (1.f + std::exp(-x)));
    out[i] = bf16(static_cast<float>(silu) * static_cast<float>(u[i]));
  }
}

// DecoderLayer.forward: updates the residual stream x in place.
void layer(at::Tensor& x, const at::Tensor* w, const int64_t* groups, const at::Tensor& kv_cache, Step& s) {
  float* xp = x.data_ptr<float>();
  const int64_t hidden = x.numel(), half_stride = kv_cache.numel() / 2;   // keys, then values
  bf16* cache = kv_cache.data_ptr<bf16>();
  rms_norm_bf16(xp, w[0].data_ptr<float>(), s.h.data_ptr<bf16>(), hidden, s.eps);
  rotary_and_write(int4(s.h, w[2], w[3], groups[0]), cache, half_stride, s);
  attend(cache, half_stride, s);
  add_bf16(xp, int4(s.attn, w[4], w[5], groups[1]), hidden);
  rms_norm_bf16(xp, w[1].data_ptr<float>(), s.h.data_ptr<bf16>(), hidden, s.eps);
  silu_mul(int4(s.h, w[6], w[7], groups[2]), s);
  add_bf16(xp, int4(s.act, w[8], w[9], groups[3]), hidden);
}

}  // namespace

// Runs every decoder layer over x [1, hidden] float32 (updated in place and returned). ``weights``
// holds 10 tensors per layer: input norm, post-attention norm, then (packed data, scales_zeros) of
// qkv, o, gate_up and down; ``groups`` the four projections' group sizes per layer. ``slots``: the
// context's cache slots (at least ``length``), the new token's the last of them.
at::Tensor decode_layers(at::Tensor x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& groups,
                         const std::vector<at::Tensor>& kv_caches, at::Tensor cos, at::Tensor signed_sin,
                         at::Tensor slots, int64_t length, int64_t nh, int64_t nkv, int64_t hd,
                         int64_t inter, double eps, double scale) {
  TORCH_CHECK(weights.size() == 10 * kv_caches.size() && groups.size() == 4 * kv_caches.size(),
              "decode_layers: 10 weights and 4 group sizes per layer");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decode_layers: x must be a contiguous [1, hidden] float32 tensor");
  for (const at::Tensor& c : kv_caches) {
    TORCH_CHECK(c.scalar_type() == at::kBFloat16 && c.is_contiguous() && c.size(-1) == hd && c.size(-2) == nkv,
                "decode_layers: every KV cache must be a contiguous plain bf16 cache");
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && cos.numel() == hd &&
              signed_sin.scalar_type() == at::kFloat && signed_sin.is_contiguous() && signed_sin.numel() == hd,
              "decode_layers: the rotary rows must be contiguous float32 [head_dim]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && length > 0 && slots.numel() >= length,
              "decode_layers: slots must hold the context's int64 cache slots");
  TORCH_CHECK(hd <= 256 && nh % nkv == 0, "decode_layers: head_dim up to 256 and whole KV-head groups");
  c10::InferenceMode guard;
  const at::TensorOptions bf16_opts = x.options().dtype(at::kBFloat16);
  const int64_t* context = slots.data_ptr<int64_t>();
  Step s{cos.data_ptr<float>(), signed_sin.data_ptr<float>(), context[length - 1], context, length,
         at::empty({1, x.size(1)}, bf16_opts), at::empty({1, nh * hd}, bf16_opts), at::empty({1, nh * hd}, bf16_opts),
         at::empty({1, inter}, bf16_opts), std::vector<float>(length), std::vector<float>(hd),
         nh, nkv, hd, inter, eps, static_cast<float>(scale)};
  for (size_t i = 0; i < kv_caches.size(); ++i) {
    layer(x, weights.data() + 10 * i, groups.data() + 4 * i, kv_caches[i], s);
  }
  return x;
}

// q8_matmul.cpp
at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset,
                     int64_t group, const std::string& isa);
std::string q8_isa(int64_t group);
// int8_blocks.cpp
at::Tensor int8_blocks_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const at::Tensor& minimum, int64_t zero, int64_t n);
at::Tensor int8_blocks_silu_mul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                                const at::Tensor& minimum, int64_t zero, int64_t n);
at::Tensor int8_blocks_argmax(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                              const at::Tensor& minimum, int64_t zero, int64_t n);
bool int8_blocks_supported();
// paged_attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, const std::string& codes);
// rotary.cpp
at::Tensor rotary_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& ssin);
// kv_write.cpp
void kv_int8_write(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& slots);
// rms_norm.cpp
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps, int64_t lanes, bool bf16_out);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_layers", &decode_layers, "Every decoder layer of a batch-1 int4 decode step");
  m.def("q8_matmul", &q8_matmul, "Grouped int8 matmul, one pass over the weights: [M, K] x [N, K]^T -> [M, N] f32",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("scale"), pybind11::arg("offset"), pybind11::arg("group"),
        pybind11::arg("isa") = "");
  m.def("q8_isa", &q8_isa, "The vector width q8_matmul runs with on this CPU for a group size");
  m.def("int8_blocks_matmul", &int8_blocks_matmul,
        "int8 x int8 (VNNI) matmul over packed block codes, activations quantized per 32 columns -> [M, n] f32");
  m.def("int8_blocks_silu_mul", &int8_blocks_silu_mul,
        "int8_blocks_matmul of a fused gate/up weight (gate the first half) -> silu(gate) * up [M, n / 2] f32");
  m.def("int8_blocks_argmax", &int8_blocks_argmax,
        "argmax over the columns of int8_blocks_matmul's product per row [M] int64, the product never stored");
  m.def("int8_blocks_supported", &int8_blocks_supported, "Whether this CPU and build run int8_blocks_matmul");
  m.def("kv_int8_write", &kv_int8_write,
        "Encodes [T, kv_heads, head_dim] K or V rows as int8 codes and a scale into an int8 cache half at slots");
  m.def("paged_decode_attention", &paged_decode_attention,
        "Decode attention of one new token per sequence, read in place from the paged KV cache",
        pybind11::arg("q"), pybind11::arg("kv_cache"), pybind11::arg("block_tables"), pybind11::arg("seq_lens"),
        pybind11::arg("scale"), pybind11::arg("codes") = "");
  m.def("rms_norm_rows", &rms_norm_rows, "RMSNorm of float32 rows, torch's sum order for its vector width");
  m.def("rotary_apply", &rotary_apply, "Rotary (rotate halves) of float32 [T, H, D] by (cos | cos, -sin | sin) rows");
}
