"""Grammar-constrained decoding in the engine, on a tiny random model (tokenizer vocab 300, logits 320):
the bitmask, the sampler's in-place mask, advance/rollback, the compile deadline and cache, and whole
runs where preemption, n > 1, seeds and stop strings meet grammars."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import torch

from inferstack.engine.builder import BuiltEngine, build_engine
from inferstack.engine.config import EngineConfig
from inferstack.engine.llm import expand_choices
from inferstack.engine.outputs import FinishReason
from inferstack.engine.sampling import apply_token_bitmask_
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.structured.compiler import GrammarCompiler, GrammarError
from inferstack.engine.structured.manager import Advance, GrammarBitmask, StructuredOutputManager
from inferstack.engine.structured.spec import GrammarKind, GrammarSpec
from support.models_tiny import write_tiny_model
from support.schemas import deep_one_of, deep_ref_one_of

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"type": "boolean"}},
          "required": ["a", "b"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> BuiltEngine:
    tiny = write_tiny_model(tmp_path_factory.mktemp("tiny"), "llama")
    return build_engine(EngineConfig(model=str(tiny), device="cpu", dtype="float32", num_kv_blocks=6,
                                     max_num_seqs=8, num_threads=1))


@pytest.fixture(scope="module")
def compiler(engine: BuiltEngine) -> GrammarCompiler:
    structured = engine.core.structured
    assert structured is not None
    return structured.compiler


def allowed(words: torch.Tensor, vocab: int) -> set[int]:
    return {t for t in range(vocab) if (int(words[t // 32]) >> (t % 32)) & 1}


def test_bitmask_rows_and_the_in_place_mask(compiler: GrammarCompiler, engine: BuiltEngine) -> None:
    manager = StructuredOutputManager(compiler, max_num_seqs=4)
    manager.start("json", compiler.compile(GrammarSpec.json_schema(SCHEMA)))
    mask = manager.bitmask(["free", "json", "other"])
    assert mask is not None and mask.rows == [1] and mask.words.shape == (3, 10)     # 320 logits / 32
    assert bool((mask.words[0] == -1).all()) and bool((mask.words[2] == -1).all())
    tok = engine.tokenizer
    first = allowed(mask.words[1], 320)
    assert first and all(tok.decode([t]).startswith("{") for t in first)
    assert manager.bitmask(["free", "other"]) is None           # no constrained row: no grammar work
    logits = torch.randn(3, 320)
    before = logits.clone()
    apply_token_bitmask_(logits, GrammarBitmask(mask.words, mask.rows))
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    finite = set(torch.isfinite(logits[1]).nonzero().flatten().tolist())
    assert finite == first and not finite & set(range(300, 320))
    assert torch.equal(logits[1][sorted(finite)], before[1][sorted(finite)])


def test_advance_rollback_and_termination(compiler: GrammarCompiler, engine: BuiltEngine) -> None:
    manager = StructuredOutputManager(compiler, max_num_seqs=2)
    manager.start("r", compiler.compile(GrammarSpec.json_schema(SCHEMA)))
    ids = engine.tokenizer.encode('{"a": 42, "b": true}')
    masks = []
    for token in ids[:-1]:
        masks.append(manager.bitmask(["r"]).words[0].clone())
        assert manager.advance("r", token) is Advance.OK
    manager.rollback("r", 3)
    assert torch.equal(manager.bitmask(["r"]).words[0], masks[len(ids) - 1 - 3])
    for token in ids[len(ids) - 1 - 3:-1]:
        assert manager.advance("r", token) is Advance.OK
    assert manager.advance("r", ids[-1]) is Advance.TERMINATED
    manager.start("bad", compiler.compile(GrammarSpec(GrammarKind.REGEX, "[0-9]+")))
    assert manager.advance("bad", engine.tokenizer.encode("x")[0]) is Advance.REJECTED


def test_compile_deadline_cache_and_errors(engine: BuiltEngine) -> None:
    compiler = GrammarCompiler(engine.tokenizer, 320, workers=1, timeout_s=0.05)
    pathological = GrammarSpec.json_schema(deep_one_of(12))
    start = time.monotonic()
    with pytest.raises(GrammarError, match=r"did not compile within 0.05 s"):
        compiler.compile(pathological)
    assert time.monotonic() - start < 1.0
    assert compiler.submit(pathological) is compiler.submit(pathological)     # one compile, however often asked
    slow = GrammarCompiler(engine.tokenizer, 320, workers=1, timeout_s=30)
    with pytest.raises(GrammarError, match="Invalid regex grammar"):
        slow.compile(GrammarSpec(GrammarKind.REGEX, "(unclosed"))
    with pytest.raises(GrammarError, match=r'Invalid json grammar: Unimplemented keys: \["uniqueItems"\]'):
        slow.compile(GrammarSpec.json_schema({"type": "array", "uniqueItems": True}))
    assert slow.compile(GrammarSpec.choice(["yes", "no"])).compile_s >= 0
    # 1,500 levels of $ref: a SIGSEGV of the whole process on a default 8 MiB thread stack
    assert slow.compile(GrammarSpec.json_schema(deep_ref_one_of(1500))).compile_s > 0
    compiler.shutdown()
    slow.shutdown()


def _run(engine: BuiltEngine, jobs: list[tuple[str, list[int], SamplingParams]]) -> dict[str, tuple[str, str]]:
    core = engine.core
    for rid, prompt, params in jobs:
        for request in expand_choices(rid, prompt, params, time.monotonic(), engine.eos_token_ids):
            core.add_request(request)
    texts: dict[str, str] = {}
    done: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + 120
    while core.has_unfinished() and time.monotonic() < deadline:
        for out in core.step():
            key = f"{out.request_id.split('#')[0]}#{out.index}"
            texts[key] = texts.get(key, "") + out.new_text
            if out.finished:
                done[key] = (texts[key], out.finish_reason)
    return done


def test_grammars_with_preemption_n_seeds_and_stop_strings(engine: BuiltEngine) -> None:
    prompt = engine.tokenizer.encode("hello world, the quick brown fox jumps over the lazy dog, hello tokens")
    json_params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=40,
                                 structured_outputs=GrammarSpec.json_schema(SCHEMA))
    free = SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
    alone = _run(engine, [("free", prompt, free)])
    preempted = engine.core.stats().num_preemptions
    done = _run(engine, [
        ("json", prompt, json_params), ("free", prompt, free),
        ("choice", prompt, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10,
                                          structured_outputs=GrammarSpec.choice(["alpha", "beta"]))),
        ("stopped", prompt, SamplingParams(temperature=1.0, seed=2, max_tokens=40, stop=['"b"'],
                                           structured_outputs=GrammarSpec.json_schema(SCHEMA)))])
    assert engine.core.stats().num_preemptions > preempted          # 6 KV blocks: the batch did not fit
    for i in range(3):
        text, reason = done[f"json#{i}"]
        assert reason is FinishReason.STOP
        jsonschema.validate(json.loads(text), SCHEMA)
    assert {done[f"choice#{i}"][0] for i in range(2)} <= {"alpha", "beta"}
    text, reason = done["stopped#0"]
    assert reason is FinishReason.STOP and text.startswith('{"a": ') and text.endswith(", ")
    assert done["free#0"] == alone["free#0"]       # unconstrained rows are untouched by the batch's mask


def test_a_failed_compile_ends_only_its_request(engine: BuiltEngine) -> None:
    prompt = engine.tokenizer.encode("hello")
    done = _run(engine, [("broken", prompt, SamplingParams(max_tokens=4, structured_outputs=GrammarSpec(
        GrammarKind.REGEX, "(unclosed"))), ("fine", prompt, SamplingParams(max_tokens=4, ignore_eos=True))])
    assert done["broken#0"][1] is FinishReason.ERROR and done["fine#0"][1] is FinishReason.LENGTH


def test_the_emulated_engine_obeys_grammars() -> None:
    """No logits there: a scripted token the grammar refuses is replaced by an allowed one."""
    from inferstack.engine.executor.emulated import build_emulated_engine
    from inferstack.sim.profile import parse_profile

    built = build_emulated_engine(EngineConfig(model="emulated", device="cpu"), parse_profile("cpu:smollm2-135m"),
                                  realtime=False)
    done = _run(built, [("e", [1, 2, 3], SamplingParams(max_tokens=30, structured_outputs=GrammarSpec.json_schema(
        SCHEMA)))])
    text, reason = done["e#0"]
    assert reason is FinishReason.STOP
    jsonschema.validate(json.loads(text), SCHEMA)
    built.core.shutdown()
