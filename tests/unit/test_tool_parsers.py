"""Tool-call parsing per model family against recorded outputs (tests/unit/data/tool_call_outputs.json),
streamed parsing equal to whole parsing however the text is chunked, grammars that accept exactly
what the parsers read, and prompt rendering of tools, calls and results."""

from __future__ import annotations

import json
from pathlib import Path

import llguidance
import pytest

from inferstack.engine.structured.compiler import grammar_text
from inferstack.engine.tokenizer import Tokenizer
from inferstack.engine.tools.formats import FORMATS, detect_format
from inferstack.engine.tools.parse import ToolCallStreamer, parse_tool_calls
from inferstack.engine.tools.plan import plan_tools, template_messages
from inferstack.protocol.errors import APIError
from inferstack.protocol.strict_schema import StrictLimits
from support.models_tiny import train_tokenizer

GOLDEN = json.loads((Path(__file__).parent / "data" / "tool_call_outputs.json").read_text())
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
             "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]


@pytest.mark.parametrize("case", GOLDEN, ids=[f"{c['family']}-{i}" for i, c in enumerate(GOLDEN)])
def test_recorded_outputs(case: dict) -> None:
    content, calls = parse_tool_calls(FORMATS[case["family"]], case["text"])
    assert content == case["content"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [tuple(c) for c in case["calls"]]
    assert len({c.id for c in calls}) == len(calls) and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
@pytest.mark.parametrize("case", GOLDEN, ids=[f"{c['family']}-{i}" for i, c in enumerate(GOLDEN)])
def test_streaming_matches_whole_parsing(case: dict, chunk: int) -> None:
    streamer = ToolCallStreamer(FORMATS[case["family"]])
    text, names, args = "", [], []
    for i in range(0, len(case["text"]), chunk):
        content, deltas = streamer.feed(case["text"][i:i + chunk])
        text += content
        for d in deltas:
            if "id" in d:       # the first delta of a call: id, type and name, empty arguments
                assert d["index"] == len(names) and d["function"]["arguments"] == "" and d["type"] == "function"
                names.append(d["function"]["name"])
                args.append("")
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                args[d["index"]] += d["function"]["arguments"]
    text += streamer.finish()
    _, whole = parse_tool_calls(FORMATS[case["family"]], case["text"])
    if case["calls"]:
        assert names == [c.name for c in whole] and args == [c.arguments for c in whole]
        assert (text.strip() or None) == case["content"]
    elif FORMATS[case["family"]].split(case["text"]) is not None:
        # a call cut off mid-way: the stream had announced it before the end showed it broken (as in vLLM)
        assert names and text == ""
    else:
        assert text == case["text"] and not names


@pytest.fixture(scope="module")
def lltok() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(train_tokenizer().to_str())


@pytest.mark.parametrize("family", sorted(FORMATS))
@pytest.mark.parametrize("choice", ["required", "named"])
def test_forcing_grammars_accept_what_the_parsers_read(family: str, choice: str, lltok) -> None:
    fmt = FORMATS[family]
    tool_choice = "required" if choice == "required" else {"type": "function", "function": {"name": "get_time"}}
    plan = plan_tools(fmt, TOOLS, tool_choice, None, StrictLimits())
    assert plan is not None and plan.grammar is not None
    calls = [("get_time", {"zone": "UTC"})] + ([("get_weather", {"city": "Oslo"})] if choice == "required" else [])
    good = fmt.render_calls(calls)
    _, parsed = parse_tool_calls(fmt, good)
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, grammar_text(plan.grammar), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher.consume_tokens(lltok.tokenize_str(text)) and matcher.is_accepting()

    assert accepts(good)
    assert not accepts(fmt.render_calls([("get_time", {"zone": "PST"})]))         # outside the enum
    assert not accepts(fmt.render_calls([("get_weather", {"city": "Oslo"})])) or choice == "required"


def test_tool_choice_errors_and_format_detection() -> None:
    fmt = FORMATS["smollm2"]
    with pytest.raises(APIError) as err:
        plan_tools(fmt, TOOLS, {"type": "function", "function": {"name": "nope"}}, None, StrictLimits())
    assert err.value.param == "tool_choice"
    with pytest.raises(APIError) as err:
        plan_tools(fmt, None, "required", None, StrictLimits())
    assert err.value.message == ("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                                 "are specified.")
    assert plan_tools(fmt, TOOLS, "none", None, StrictLimits()) is None
    assert plan_tools(fmt, TOOLS, None, False, StrictLimits()).parallel is False
    assert detect_format("auto", "{{ '[TOOL_CALLS]' }}", "m").name == "mistral"
    assert detect_format("auto", "<|python_tag|>", "m").name == "llama3_json"
    assert detect_format("auto", None, "SmolLM2-135M-Instruct").name == "smollm2"
    assert detect_format("auto", None, "Qwen2.5-7B").name == "hermes"


def test_prompt_rendering_without_a_tools_template() -> None:
    plan = plan_tools(FORMATS["smollm2"], TOOLS, "auto", None, StrictLimits())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "12 C"}]
    out = template_messages(FORMATS["smollm2"], plan, messages, native=False)
    assert out[0]["content"].startswith("Be brief.\n\nYou are an expert in composing functions.")
    assert '<tools>[{"name": "get_weather"' in out[0]["content"]
    assert out[2] == {"role": "assistant",
                      "content": '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n12 C\n</tool_response>"}
    native = template_messages(FORMATS["hermes"], plan, messages, native=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}     # objects, as templates expect
    tok = Tokenizer(train_tokenizer(), chat_template="{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    assert "<tool_response>" in tok.apply_chat_template(out)


@pytest.fixture(scope="module")
def mistral_tok() -> Tokenizer:
    """A tokenizer where `[TOOL_CALLS]` is one special token, as in Mistral's (v0.3, Nemo)."""
    backend = train_tokenizer()
    backend.add_special_tokens(["[TOOL_CALLS]"])
    return Tokenizer(backend)


@pytest.mark.parametrize("case", [c for c in GOLDEN if c["family"] == "mistral" and c["calls"]])
def test_mistral_calls_parse_from_token_ids_with_the_default_skip_special_tokens(case: dict, mistral_tok) -> None:
    """The recorded output as the model emits it (the marker one special token): detokenized with the
    defaults a user gets (skip_special_tokens true), streamed token by token and whole, the calls parse."""
    fmt = FORMATS["mistral"]
    marker = mistral_tok.special_token_id("[TOOL_CALLS]")
    ids = mistral_tok.encode(case["text"])
    assert marker is not None and ids.count(marker) == 1
    assert "[TOOL_CALLS]" not in mistral_tok.decode(ids)          # what skip_special_tokens alone leaves
    plan = plan_tools(fmt, TOOLS, "auto", None, StrictLimits(), marker)
    detok = mistral_tok.detokenizer(skip_special_tokens=True, keep_special_ids=plan.keep_special_ids)
    streamer, names, args = ToolCallStreamer(fmt), [], []
    for token in ids:
        content, deltas = streamer.feed(detok.feed([token]))
        assert content == ""
        for d in deltas:
            if "id" in d:
                names.append(d["function"]["name"])
                args.append("")
            else:
                args[d["index"]] += d["function"]["arguments"]
    assert streamer.feed(detok.finish()) == ("", []) and streamer.finish() == ""
    text = mistral_tok.decode(ids, keep_special_ids=plan.keep_special_ids)
    assert text == case["text"]
    content, calls = parse_tool_calls(fmt, text)
    expected = [(name, arguments) for name, arguments in case["calls"]]
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert [(n, json.loads(a)) for n, a in zip(names, args, strict=True)] == expected


def test_mistral_forcing_grammar_takes_the_special_token(mistral_tok) -> None:
    """With `[TOOL_CALLS]` a special token, `required` forces that token, not the marker spelled as text."""
    marker = mistral_tok.special_token_id("[TOOL_CALLS]")
    plan = plan_tools(FORMATS["mistral"], TOOLS, "required", None, StrictLimits(), marker)
    assert plan is not None and plan.grammar is not None
    lltok = llguidance.LLTokenizer(mistral_tok.backend.to_str())
    body = mistral_tok.encode(' [{"name": "get_time", "arguments": {"zone": "UTC"}}]')

    def accepts(ids: list[int]) -> bool:
        matcher = llguidance.LLMatcher(lltok, grammar_text(plan.grammar), log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher.consume_tokens(ids) and matcher.is_accepting()

    assert accepts([marker, *body]) and accepts([marker, *body[1:]])       # " [" or "["
    assert not accepts(mistral_tok.encode("[") + body)
    assert not accepts(body)
