"""ModelArch from HF configs: families, rope variants, sliding windows, parameter counts."""

from __future__ import annotations

import pytest
import torch

from inferstack.engine.models.arch import ModelLoadError, rope_settings
from inferstack.engine.models.layers import rope_inv_freq
from inferstack.engine.models.registry import family_for

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=1024)


def arch_of(**config):
    config = {**BASE, **config}
    name, family = family_for(config, "cfg")
    return family.to_arch(config, name, "cfg")


def test_family_flags():
    assert not arch_of(architectures=["LlamaForCausalLM"]).qkv_bias
    assert arch_of(architectures=["LlamaForCausalLM"], attention_bias=True).qkv_bias
    assert arch_of(architectures=["Qwen2ForCausalLM"]).qkv_bias
    q3 = arch_of(architectures=["Qwen3ForCausalLM"], head_dim=32)
    assert q3.qk_norm and not q3.qkv_bias and q3.head_dim == 32 and q3.q_size == 128


def test_rope_settings_old_and_new_keys():
    assert rope_settings({"rope_theta": 5e5}) == (5e5, None)
    assert rope_settings({"rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}}) == (1e4, None)
    theta, scaling = rope_settings({"rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert theta == 1e4 and scaling == {"rope_type": "linear", "factor": 2.0}
    linear = arch_of(architectures=["LlamaForCausalLM"], rope_scaling={"type": "linear", "factor": 2.0})
    plain = arch_of(architectures=["LlamaForCausalLM"])
    torch.testing.assert_close(rope_inv_freq(linear), rope_inv_freq(plain) / 2)


def test_unsupported_rope_type_is_named():
    arch = arch_of(architectures=["LlamaForCausalLM"], rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="rope scaling type 'yarn' is not supported"):
        rope_inv_freq(arch)


def test_sliding_window_caps_context_instead_of_being_ignored():
    assert arch_of(architectures=["MistralForCausalLM"], sliding_window=4096).max_position_embeddings == 1024
    assert arch_of(architectures=["MistralForCausalLM"], sliding_window=256).max_position_embeddings == 256
    # Qwen2 configs carry a window that is off unless use_sliding_window is set
    assert arch_of(architectures=["Qwen2ForCausalLM"], sliding_window=256,
                   use_sliding_window=False).max_position_embeddings == 1024


def test_param_counts_and_bytes_per_step():
    tied = arch_of(architectures=["LlamaForCausalLM"], tie_word_embeddings=True).finalize(torch.bfloat16)
    untied = arch_of(architectures=["LlamaForCausalLM"]).finalize(torch.float32)
    assert untied.num_params - tied.num_params == 100 * 64
    # a step reads the body and the LM head once, whether or not it is tied
    assert tied.weight_bytes_per_step * 2 == untied.weight_bytes_per_step


def test_bad_configs():
    with pytest.raises(ModelLoadError, match="cfg: missing required key 'hidden_size'"):
        arch_of(architectures=["LlamaForCausalLM"], hidden_size=None)
    with pytest.raises(ModelLoadError, match="not a multiple of num_key_value_heads=3"):
        arch_of(architectures=["LlamaForCausalLM"], num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="mlp_bias=true is not supported"):
        arch_of(architectures=["LlamaForCausalLM"], mlp_bias=True)
