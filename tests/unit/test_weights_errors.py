"""HF directories: sharded checkpoints load; broken ones fail with a message naming what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.support.models_tiny import write_tiny_model

from inferstack.engine.models.arch import ModelLoadError
from inferstack.engine.weights.loader import load_model, resolve_model_path

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("good"), "qwen2", seed=1)


@pytest.fixture
def broken(good, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(good, target)
    return target


def edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def test_sharded_checkpoint_loads_identically(good, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(good).save_pretrained(sharded, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(good / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").exists()
    a, b = load_model(str(good)), load_model(str(sharded))
    assert len(b.weight_files) > 1
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"model: missing config\.json"):
        load_model(str(broken))


def test_unknown_architecture(broken):
    edit_config(broken, architectures=["MambaForCausalLM"])
    with pytest.raises(ModelLoadError, match=r"unknown architecture \['MambaForCausalLM'\]; expected one of "
                                             r"\['LlamaForCausalLM'"):
        load_model(str(broken))


def test_missing_tensor(broken):
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight "
                                             r"\(shape \[96, 64\]\)"):
        load_model(str(broken))


def test_wrong_shape(broken):
    edit_config(broken, intermediate_size=80)
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape "
                                             r"\[96, 64\], expected \[80, 64\] from config\.json"):
        load_model(str(broken))


def test_extra_layers_in_weights(broken):
    edit_config(broken, num_hidden_layers=1)
    with pytest.raises(ModelLoadError, match=r"unexpected tensor model\.layers\.1\..*with 1 layers"):
        load_model(str(broken))


def test_missing_shard(good, tmp_path):
    import transformers

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(good).save_pretrained(sharded, max_shard_size="20KB")
    victim = sorted(sharded.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=rf"missing shard {victim.name}, listed in model\.safetensors\.index"):
        load_model(str(sharded))


def test_missing_tokenizer(broken):
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"missing tokenizer\.json"):
        load_model(str(broken))


def test_corrupt_config_json_has_a_line(broken):
    (broken / "config.json").write_text('{\n  "hidden_size": 64,\n  oops\n}')
    with pytest.raises(ModelLoadError, match=r"config\.json:3: invalid JSON"):
        load_model(str(broken))


def test_references(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or directory; expected an HF model directory"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="oci:// references must be pulled first"):
        resolve_model_path("oci://registry.local/models/smol:1")
    assert resolve_model_path("smollm2-135m").name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_dtype_errors(good):
    with pytest.raises(ModelLoadError, match="float16 is only supported on CUDA"):
        load_model(str(good), dtype="float16")
    with pytest.raises(ModelLoadError, match="dtype 'int8' is not supported"):
        load_model(str(good), dtype="int8")
