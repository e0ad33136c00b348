"""Find tool-call objects in (possibly unfinished) model output, one character pass, no JSON parse
of the unfinished parts.

Every family writes each call as a JSON object with a ``name`` and an arguments object (``arguments``,
or ``parameters`` for Llama 3); what surrounds the objects (``[``, ``,``, ``</tool_call>``, ``; ``) is
ignored. For an unfinished object the arguments seen so far are a prefix of the final ones, which is
what lets a stream send ``arguments`` piece by piece.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

ARGUMENT_KEYS = ("arguments", "parameters")
_WS = " \t\r\n"


@dataclass
class ScannedCall:
    name: str | None = None
    args_start: int | None = None
    args_end: int | None = None
    complete: bool = False

    def arguments(self, text: str) -> str:
        if self.args_start is None:
            return ""
        return text[self.args_start:self.args_end if self.args_end is not None else len(text)]


@dataclass
class _State:
    depth: int = 0
    in_string: bool = False
    escape: bool = False
    string_start: int = 0
    key: str | None = None
    expect: str = "key"          # key -> colon -> value -> after, at the call object's top level


def scan_calls(text: str) -> list[ScannedCall]:
    calls: list[ScannedCall] = []
    st = _State()
    for i, ch in enumerate(text):
        if st.in_string:
            if st.escape:
                st.escape = False
            elif ch == "\\":
                st.escape = True
            elif ch == '"':
                st.in_string = False
                if st.depth == 1:
                    _string_done(st, calls[-1], text[st.string_start:i + 1])
            continue
        if st.depth == 0:
            if ch == "{":
                calls.append(ScannedCall())
                st = _State(depth=1)
            continue
        _structural(st, calls[-1], ch, i)
    return calls


def _string_done(st: _State, call: ScannedCall, raw: str) -> None:
    if st.expect == "key":
        st.key, st.expect = _loads(raw), "colon"
    elif st.expect == "value":
        if st.key == "name" and call.name is None:
            call.name = _loads(raw)
        elif st.key in ARGUMENT_KEYS and call.args_end is None:
            call.args_end = call.args_start + len(raw) if call.args_start is not None else None
        st.expect = "after"


def _structural(st: _State, call: ScannedCall, ch: str, i: int) -> None:
    is_args = st.key in ARGUMENT_KEYS and call.args_end is None
    if ch == '"':
        st.in_string, st.string_start = True, i
        if st.depth == 1 and st.expect == "value" and is_args and call.args_start is None:
            call.args_start = i
    elif ch in "{[":
        if st.depth == 1 and st.expect == "value" and is_args and call.args_start is None:
            call.args_start = i
        st.depth += 1
    elif ch in "}]":
        st.depth -= 1
        if st.depth == 1 and is_args and call.args_start is not None:
            call.args_end, st.expect = i + 1, "after"
        elif st.depth == 0:
            if is_args and call.args_start is not None:
                call.args_end = i      # a scalar value ends at the closing brace
            call.complete = True
    elif st.depth == 1:
        if ch == ":" and st.expect == "colon":
            st.expect = "value"
        elif ch == ",":
            if is_args and call.args_start is not None:
                call.args_end = i
            st.expect = "key"
        elif ch not in _WS and st.expect == "value" and is_args and call.args_start is None:
            call.args_start = i        # a scalar (number, true, null): unusual, still kept


def _loads(raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None
