"""KV cache precision (--kv-cache-dtype): row layout, rounding bounds, and paged attention over int8/fp8 rows."""

from __future__ import annotations

import pytest
import torch
from tests.support.models_tiny import make_meta

from inferstack.engine.executor.attention import paged_attention
from inferstack.engine.executor.kv_format import KVFormat

HD = 64


def _fmt(name: str) -> KVFormat:
    return KVFormat.resolve(name, torch.float32, HD, quantized_weights=False)


def test_auto_follows_the_activations_and_quantized_weights_get_bf16():
    assert _fmt("auto").name == "float32" and _fmt("auto").key_suffix() == ""
    assert KVFormat.resolve("auto", torch.float32, HD, quantized_weights=True).name == "bfloat16"
    assert KVFormat.resolve("auto", torch.bfloat16, HD, quantized_weights=False).key_suffix() == ""
    assert _fmt("int8").key_suffix() == "+kv-int8" and _fmt("bfloat16").key_suffix() == "+kv-bfloat16"
    with pytest.raises(ValueError, match="fp8_e4m3"):
        _fmt("fp4")


@pytest.mark.parametrize(("name", "bytes_per_row", "bound"),
                         [("bfloat16", 128, 2 ** -8), ("int8", 68, 0.5 / 127), ("fp8_e4m3", 68, 2 ** -4)])
def test_rows_round_within_the_format_bound(name, bytes_per_row, bound):
    fmt = _fmt(name)
    x = torch.randn(5, 3, HD) * torch.tensor([1e-3, 1.0, 300.0])[None, :, None]    # scales differ per head
    rows = fmt.encode(x)
    assert rows.shape == (5, 3 * fmt.row) and rows.dtype == fmt.storage
    assert fmt.bytes_per_row() == bytes_per_row
    back = fmt.decode(rows.view(-1, fmt.row)).view_as(x)
    amax = x.abs().amax(-1, keepdim=True)
    # int8: half a step of amax/127; bf16 and fp8: relative to each value (fp8 also near amax/448's floor)
    limit = bound * (amax if name == "int8" else x.abs() + amax / 448)
    assert (back - x).abs().le(limit * 1.0001).all()
    if fmt.quantized:   # the scale sits right after the codes, per (token, head)
        scale = rows.view(5, 3, fmt.row)[..., HD:].contiguous().view(torch.float32)
        torch.testing.assert_close(scale, amax / (127 if name == "int8" else 448))


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_paged_attention_reads_quantized_rows_back(name):
    """Mixed prefill-with-context and decode over a quantized cache equals attention over the
    dequantized context (and stays close to the float32 cache)."""
    fmt = _fmt(name)
    torch.manual_seed(0)
    nh, nkv, bs = 6, 2, 16
    seqs = [([3, 1], 20, 5), ([0, 2], 17, 1)]          # (block table, cached tokens, new tokens)
    meta, _ = make_meta(seqs, bs)
    ctx_k, ctx_v = torch.randn(4, bs, nkv, HD), torch.randn(4, bs, nkv, HD)
    dense = torch.stack((ctx_k, ctx_v))
    quant = torch.stack((fmt.encode(ctx_k.view(-1, nkv, HD)), fmt.encode(ctx_v.view(-1, nkv, HD)))).view(
        2, 4, bs, nkv, fmt.row)
    dequant = fmt.decode(quant.view(-1, fmt.row)).view(2, 4, bs, nkv, HD)
    q, k, v = torch.randn(6, nh, HD), torch.randn(6, nkv, HD), torch.randn(6, nkv, HD)
    k_r, v_r = (fmt.decode(fmt.encode(x).view(-1, fmt.row)).view_as(x) for x in (k, v))
    want = paged_attention(q, k_r, v_r, dequant.clone(), meta, HD ** -0.5)
    exact = paged_attention(q, k, v, dense.clone(), meta, HD ** -0.5)
    meta.kv_format = fmt
    got = paged_attention(q, k, v, quant, meta, HD ** -0.5)
    # every read goes through the stored (rounded) rows, the step's own tokens included
    torch.testing.assert_close(got, want, atol=2e-2 if name == "fp8_e4m3" else 1e-5, rtol=0)
    torch.testing.assert_close(got, exact, atol=0.1, rtol=0)
    written = fmt.decode(quant[0].view(-1, nkv * fmt.row)[meta.slot_mapping].view(-1, fmt.row))
    torch.testing.assert_close(written.view(6, nkv, HD), k, atol=0.07 * k.abs().max().item(), rtol=0)


def test_the_setting_reaches_engines_and_bad_values_are_clear():
    from pydantic import ValidationError

    from inferstack.engine.config import EngineConfig
    from inferstack.stack.plan import engine_specs
    from inferstack.stack.settings import UpSettings

    (spec, _) = engine_specs(UpSettings(kv_cache_dtype="int8", quantization="int4"))
    argv = list(spec.argv)
    assert argv[argv.index("--kv-cache-dtype") + 1] == "int8" and "--quantization" in argv
    assert "--kv-cache-dtype" not in engine_specs(UpSettings())[0].argv
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        UpSettings(kv_cache_dtype="fp4")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(model="m", kv_cache_dtype="fp4")
