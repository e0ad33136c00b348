// The decoder layers of one batch-1 decode step in C++ (engine/models/fused_decode.py).
//
// The same ATen calls, in the same order and with the same arguments, as the Python layer loop
// (models/llama.py, layers.py, quant_linear.py, executor/attention.py) for its int4, bf16-KV,
// float32-stream case, so the results are bit-identical; what goes away is the Python interpreter
// and argument parsing around each of the ~40 small ops per layer.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>   // at::Tensor <-> torch.Tensor; lighter than torch/extension.h

#include <vector>

namespace {

struct Step {
  at::Tensor cos, signed_sin;          // [1, 1, head_dim] float32 rotary rows of this token
  at::Tensor slot_mapping;             // [1] cache slot of the new token
  at::Tensor head_rows;                // [num_kv_heads * L] rows of the decode gather
  at::Tensor buffer;                   // [2, num_kv_heads * L, head_dim] gather target
  at::Tensor bias;                     // [1, 1, 1, L] additive mask
  int64_t nh, nkv, hd, inter;
  double eps, scale;
};

// layers.rms_norm(x, weight, eps, out_dtype=bfloat16) for a float32 stream.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x * x.pow(2).mean({-1}, true).add_(eps).rsqrt_();
  at::Tensor out = at::empty(h.sizes(), h.options().dtype(at::kBFloat16));
  return at::mul_out(out, h, weight);
}

// QuantizedLinear on its int4 kernel: bf16 in, bf16 out.
at::Tensor int4(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scales, int64_t group) {
  return at::_weight_int4pack_mm_for_cpu(x, data, group, scales);
}

// Rotary.apply: rotate halves in the tables' dtype.
at::Tensor rotary(const at::Tensor& qk, const Step& s) {
  at::Tensor x = qk.to(s.cos.scalar_type());
  std::vector<at::Tensor> halves = x.chunk(2, -1);
  return x * s.cos + at::cat({halves[1], halves[0]}, -1) * s.signed_sin;
}

// paged_attention_planned + _decode for one sequence with a plain bf16 cache.
at::Tensor attend(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& kv_cache, const Step& s) {
  const int64_t t = qk.size(0);
  const auto storage = kv_cache.scalar_type();
  at::Tensor q = qk.slice(1, 0, s.nh);
  at::Tensor k = qk.slice(1, s.nh);
  if (q.scalar_type() != storage) q = q.to(storage);
  at::Tensor kr = k.reshape({t, -1});
  if (kr.scalar_type() != storage) kr = kr.to(storage);
  at::Tensor vr = v.reshape({t, -1});
  if (vr.scalar_type() != storage) vr = vr.to(storage);
  const int64_t row = kv_cache.size(-1);
  at::Tensor cache = kv_cache.view({2, -1, s.nkv * row});
  cache.select(0, 0).index_copy_(0, s.slot_mapping, kr);
  cache.select(0, 1).index_copy_(0, s.slot_mapping, vr);
  at::Tensor heads = kv_cache.view({2, -1, row});
  at::Tensor kv = s.buffer;   // a handle: the gather writes the plan's buffer
  at::index_select_out(kv, heads, 1, s.head_rows);
  const int64_t length = s.bias.size(-1);
  kv = kv.view({2, 1, s.nkv, length, s.hd});
  q = q.view({1, s.nkv, s.nh / s.nkv, s.hd});
  at::Tensor out = at::scaled_dot_product_attention(q, kv.select(0, 0), kv.select(0, 1), s.bias, 0.0, false,
                                                    s.scale, false);
  return out.reshape({1, s.nh * s.hd});
}

// DecoderLayer.forward: updates the residual stream x in place.
void layer(at::Tensor& x, const at::Tensor* w, const int64_t* groups, const at::Tensor& kv_cache, const Step& s) {
  const int64_t t = x.size(0);
  at::Tensor h = rms_norm_bf16(x, w[0], s.eps);
  at::Tensor qkv = int4(h, w[2], w[3], groups[0]).view({t, s.nh + 2 * s.nkv, s.hd});
  at::Tensor qk = rotary(qkv.slice(1, 0, s.nh + s.nkv), s);
  at::Tensor attn = attend(qk, qkv.slice(1, s.nh + s.nkv), kv_cache, s);
  x.add_(int4(attn, w[4], w[5], groups[1]));
  h = rms_norm_bf16(x, w[1], s.eps);
  std::vector<at::Tensor> gate_up = int4(h, w[6], w[7], groups[2]).split(s.inter, -1);
  x.add_(int4(at::silu(gate_up[0]) * gate_up[1], w[8], w[9], groups[3]));
}

}  // namespace

// Runs every decoder layer over x [1, hidden] float32 (updated in place and returned). ``weights``
// holds 10 tensors per layer: input norm, post-attention norm, then (packed data, scales_zeros) of
// qkv, o, gate_up and down; ``groups`` the four projections' group sizes per layer.
at::Tensor decode_layers(at::Tensor x, const std::vector<at::Tensor>& weights, const std::vector<int64_t>& groups,
                         const std::vector<at::Tensor>& kv_caches, at::Tensor cos, at::Tensor signed_sin,
                         at::Tensor slot_mapping, at::Tensor head_rows, at::Tensor buffer, at::Tensor bias,
                         int64_t nh, int64_t nkv, int64_t hd, int64_t inter, double eps, double scale) {
  TORCH_CHECK(weights.size() == 10 * kv_caches.size() && groups.size() == 4 * kv_caches.size(),
              "decode_layers: 10 weights and 4 group sizes per layer");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat,
              "decode_layers: x must be [1, hidden] float32");
  c10::InferenceMode guard;
  Step s{cos, signed_sin, slot_mapping, head_rows, buffer, bias, nh, nkv, hd, inter, eps, scale};
  for (size_t i = 0; i < kv_caches.size(); ++i) {
    layer(x, weights.data() + 10 * i, groups.data() + 4 * i, kv_caches[i], s);
  }
  return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_layers", &decode_layers, "Every decoder layer of a batch-1 int4 decode step");
}
