// The decoder layers of one batch-1 decode step in C++ (engine/models/fused_decode.py).
//
// The Python layer loop (models/llama.py, layers.py, quant_linear.py, executor/attention.py) for its
// int4, bf16-KV, float32-stream case, bit for bit: the matmuls, the norms' statistics, SDPA, SiLU and
// the residual adds are the same ATen calls with the same arguments; the element-wise glue between
// them (norm scaling and bf16 cast, rotary, the cache write, the K/V gather) is plain loops that round
// exactly where torch's kernels round. What goes away is the Python interpreter around ~40 small ops
// per layer and most of their dispatches and allocations.
#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>   // at::Tensor <-> torch.Tensor; lighter than torch/extension.h

#include <cstring>
#include <string>
#include <vector>

namespace {

struct Step {
  at::Tensor cos, signed_sin;          // [1, 1, head_dim] float32 rotary rows of this token
  int64_t slot;                        // cache slot of the new token
  at::Tensor head_rows;                // [num_kv_heads * L] rows of the decode gather
  at::Tensor buffer;                   // [2, num_kv_heads * L, head_dim] gather target
  at::Tensor bias;                     // [1, 1, 1, L] additive mask
  int64_t nh, nkv, hd, inter;
  double eps, scale;
};

// layers.rms_norm(x, weight, eps, out_dtype=bfloat16) for a float32 stream. The statistics stay ATen
// ops (their summation order is torch's); the two multiplies and the bf16 rounding are one loop with
// the same float32 roundings as ``x * r`` then ``torch.mul(h, weight, out=<bf16>)``.
at::Tensor rms_norm_bf16(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const float r = x.pow(2).mean({-1}, true).add_(eps).rsqrt_().item<float>();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0, n = x.numel(); i < n; ++i) {
    const float h = xp[i] * r;
    op[i] = at::BFloat16(h * wp[i]);
  }
  return out;
}

// QuantizedLinear on its int4 kernel: bf16 in, bf16 out.
at::Tensor int4(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scales, int64_t group) {
  return at::_weight_int4pack_mm_for_cpu(x, data, group, scales);
}

// Rotary.apply on the q and k heads of ``qkv [nh + 2 nkv, hd]`` (bf16), then the cache write: rotated q
// heads go to the returned bf16 tensor, rotated k heads and the v heads straight into the token's cache
// slot. Each element is rounded as torch rounds ``x * cos + cat(x2, x1) * signed_sin`` (three float32
// roundings, no fused multiply-add: built with -ffp-contract=off) and then cast to bf16.
at::Tensor rotary_and_write(const at::Tensor& qkv, const at::Tensor& kv_cache, const Step& s) {
  TORCH_CHECK(qkv.is_contiguous() && qkv.scalar_type() == at::kBFloat16, "decode_layers: qkv must be bf16");
  const int64_t hd = s.hd, half = hd / 2;
  const float* cos = s.cos.data_ptr<float>();
  const float* sin = s.signed_sin.data_ptr<float>();
  const at::BFloat16* in = qkv.data_ptr<at::BFloat16>();
  at::Tensor q = at::empty({1, s.nh, hd}, qkv.options());
  at::BFloat16* cache = kv_cache.data_ptr<at::BFloat16>();
  const int64_t half_stride = kv_cache.numel() / 2;           // keys, then values
  at::BFloat16* k_row = cache + s.slot * s.nkv * hd;
  at::BFloat16* v_row = k_row + half_stride;
  for (int64_t h = 0; h < s.nh + s.nkv; ++h) {
    const at::BFloat16* x = in + h * hd;
    at::BFloat16* out = h < s.nh ? q.data_ptr<at::BFloat16>() + h * hd : k_row + (h - s.nh) * hd;
    for (int64_t d = 0; d < hd; ++d) {
      const float a = static_cast<float>(x[d]) * cos[d];
      const float b = static_cast<float>(x[d < half ? d + half : d - half]) * sin[d];
      out[d] = at::BFloat16(a + b);
    }
  }
  std::memcpy(v_row, in + (s.nh + s.nkv) * hd, s.nkv * hd * sizeof(at::BFloat16));
  return q;
}

// _decode for one sequence: gather the context's K/V rows head-major into the plan's buffer (plain row
// copies, as index_select makes them), then SDPA with the additive mask.
at::Tensor attend(const at::Tensor& q, const at::Tensor& kv_cache, const Step& s) {
  const int64_t row = kv_cache.size(-1), rows = s.head_rows.numel();
  const int64_t half_stride = kv_cache.numel() / 2;
  const at::BFloat16* cache = kv_cache.data_ptr<at::BFloat16>();
  at::BFloat16* buf = s.buffer.data_ptr<at::BFloat16>();
  const int64_t* idx = s.head_rows.data_ptr<int64_t>();
  for (int64_t half = 0; half < 2; ++half) {
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(buf + (half * rows + i) * row, cache + half * half_stride + idx[i] * row,
                  row * sizeof(at::BFloat16));
    }
  }
  const int64_t length = s.bias.size(-1);
  at::Tensor kv = s.buffer.view({2, 1, s.nkv, length, s.hd});
  at::Tensor out = at::scaled_dot_product_attention(q.view({1, s.nkv, s.nh / s.nkv, s.hd}), kv.select(0, 0),
                                                    kv.select(0, 1), s.bias, 0.0, false, s.scale, false);
  return out.reshape({1, s.nh * s.hd});
}

// DecoderLayer.forward: updates the residual stream x in place.
void layer(at::Tensor& x, const at::Tensor* w, const int64_t* groups, const at::Tensor& kv_cache, const Step& s) {
  at::Tensor h = rms_norm_bf16(x, w[0], s.eps);
  at::Tensor q = rotary_and_write(int4(h, w[2], w[3], groups[0]), kv_cache, s);
  x.add_(int4(attend(q, kv_cache, s), w[4], w[5], groups[1]));
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
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decode_layers: x must be a contiguous [1, hidden] float32 tensor");
  for (const at::Tensor& c : kv_caches) {
    TORCH_CHECK(c.scalar_type() == at::kBFloat16 && c.is_contiguous() && c.size(-1) == hd,
                "decode_layers: every KV cache must be a contiguous plain bf16 cache");
  }
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && signed_sin.is_contiguous() &&
              head_rows.scalar_type() == at::kLong && head_rows.is_contiguous() && buffer.is_contiguous(),
              "decode_layers: unexpected rotary tables or gather inputs");
  c10::InferenceMode guard;
  Step s{cos, signed_sin, slot_mapping.item<int64_t>(), head_rows, buffer, bias, nh, nkv, hd, inter, eps, scale};
  for (size_t i = 0; i < kv_caches.size(); ++i) {
    layer(x, weights.data() + 10 * i, groups.data() + 4 * i, kv_caches[i], s);
  }
  return x;
}

// q8_matmul.cpp
at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& offset,
                     int64_t group, const std::string& isa);
std::string q8_isa(int64_t group);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_layers", &decode_layers, "Every decoder layer of a batch-1 int4 decode step");
  m.def("q8_matmul", &q8_matmul, "Grouped int8 matmul, one pass over the weights: [M, K] x [N, K]^T -> [M, N] f32",
        pybind11::arg("x"), pybind11::arg("q"), pybind11::arg("scale"), pybind11::arg("offset"), pybind11::arg("group"),
        pybind11::arg("isa") = "");
  m.def("q8_isa", &q8_isa, "The vector width q8_matmul runs with on this CPU for a group size");
}
