"""Values inside a run: Dify references, if-else operators, start-node input rules."""

from __future__ import annotations

import pytest

from inferstack.workflow.conditions import ConditionError, evaluate_cases
from inferstack.workflow.context import RunContext
from inferstack.workflow.dsl import Node
from inferstack.workflow.inputs import InputError, coerce_inputs

CTX = RunContext({"a": {"text": "hello world", "n": 3, "obj": {"k": [1, 2]}, "tags": ["x", "y"], "none": None}})


def test_render_and_nested_selectors() -> None:
    assert CTX.render("{{#a.text#}} / {{#a.n#}} / {{#a.obj.k#}} / {{#a.none#}} / {{#gone.x#}}") == \
        "hello world / 3 / [1, 2] /  / "
    step = CTX.child(it={"item": "p"})
    assert step.get(["it", "item"]) == "p" and step.get(["a", "n"]) == 3


@pytest.mark.parametrize(("selector", "op", "value", "holds"), [
    (["a", "text"], "contains", "world", True), (["a", "text"], "not contains", "world", False),
    (["a", "text"], "start with", "hell", True), (["a", "text"], "end with", "x", False),
    (["a", "text"], "is", "hello world", True), (["a", "n"], ">", "2", True), (["a", "n"], "≤", "2", False),
    (["a", "n"], "=", "3", True), (["a", "none"], "empty", None, True), (["a", "tags"], "all of", ["x"], True),
    (["a", "text"], "in", "hello world,bye", True), (["a", "none"], "null", None, True),
])
def test_operators(selector: list[str], op: str, value: object, holds: bool) -> None:
    data = {"cases": [{"case_id": "c", "logical_operator": "and",
                       "conditions": [{"variable_selector": selector, "comparison_operator": op, "value": value}]}]}
    assert evaluate_cases(data, CTX) == ("c" if holds else None)


def test_first_true_case_wins_and_or_logic() -> None:
    cond = {"variable_selector": ["a", "n"], "comparison_operator": ">", "value": "5"}
    true = {"variable_selector": ["a", "n"], "comparison_operator": "<", "value": "5"}
    data = {"cases": [{"case_id": "one", "logical_operator": "and", "conditions": [cond, true]},
                      {"case_id": "two", "logical_operator": "or", "conditions": [cond, true]}]}
    assert evaluate_cases(data, CTX) == "two"
    assert evaluate_cases({"logical_operator": "and", "conditions": [true]}, CTX) == "true"  # legacy form
    with pytest.raises(ConditionError, match="cannot compare"):
        evaluate_cases({"conditions": [{"variable_selector": ["a", "text"], "comparison_operator": ">",
                                        "value": "1"}]}, CTX)


def test_inputs_follow_the_start_node() -> None:
    start = Node("s", "start", "s", {"variables": [
        {"variable": "q", "type": "text-input", "required": True, "max_length": 5},
        {"variable": "k", "type": "number", "required": False, "default": 2},
        {"variable": "mode", "type": "select", "options": ["a", "b"], "required": False}]}, 1, None)
    assert coerce_inputs(start, {"q": "hi", "k": "2.5"}) == {"q": "hi", "k": 2.5, "mode": None}
    assert coerce_inputs(start, {"q": "hi"})["k"] == 2
    for bad, message in [({}, "is required"), ({"q": "toolong"}, "max_length"), ({"q": "x", "k": "n"}, "number"),
                         ({"q": "x", "mode": "c"}, "one of"), ({"q": "x", "zz": "1"}, "unknown input")]:
        with pytest.raises(InputError, match=message):
            coerce_inputs(start, bad)
