"""Dify DSL import: version/status rules, round-trip export, errors naming node id, type and line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from inferstack.workflow.dsl import DslError, ImportStatus, export_app, parse_app, version_status

EXAMPLE = Path(__file__).resolve().parents[2] / "src/inferstack/assets/workflows/research_brief.yml"

MINIMAL = """\
version: {version}
kind: {kind}
app: {{name: t, mode: workflow}}
workflow:
  graph:
    nodes:
    - id: start
      data: {{type: start, title: Start, variables: []}}
    - id: x
      data:
        type: {xtype}
        title: X
        answer: "{{{{#{ref}.text#}}}}"
    edges:
    - {{source: start, target: x}}
"""


def doc(version: str = '"0.5.0"', kind: str = "app", xtype: str = "answer", ref: str = "start") -> str:
    return MINIMAL.format(version=version, kind=kind, xtype=xtype, ref=ref)


@pytest.mark.parametrize(("version", "status"), [
    ("0.5.0", ImportStatus.COMPLETED), ("0.5.3", ImportStatus.PENDING), ("0.6.0", ImportStatus.PENDING),
    ("1.0.0", ImportStatus.PENDING), ("0.4.9", ImportStatus.COMPLETED_WITH_WARNINGS),
    ("0.1.0", ImportStatus.COMPLETED_WITH_WARNINGS), ("abc", ImportStatus.FAILED),
])
def test_version_rules(version: str, status: ImportStatus) -> None:
    assert version_status(version) is status


def test_missing_version_is_010_and_kind_forced() -> None:
    app = parse_app(doc().replace('version: "0.5.0"\n', "").replace("kind: app", "kind: other"))
    assert app.document["version"] == "0.1.0" and app.document["kind"] == "app"
    assert app.status is ImportStatus.COMPLETED_WITH_WARNINGS and app.warnings


def test_version_must_be_a_string() -> None:
    with pytest.raises(DslError, match=r"<string>:1: version must be a string"):
        parse_app(doc(version="0.5"))


def test_pending_needs_confirmation() -> None:
    with pytest.raises(DslError, match="needs confirmation"):
        parse_app(doc(version='"0.6.0"'))
    assert parse_app(doc(version='"0.6.0"'), confirm_pending=True).status is ImportStatus.PENDING


def test_unknown_node_type_names_id_type_line() -> None:
    with pytest.raises(DslError) as err:
        parse_app(doc(xtype="teleport"), "app.yml")
    assert err.value.problems == ["app.yml:9: node x (teleport): unknown node type"]


def test_broken_reference_names_node_and_line() -> None:
    with pytest.raises(DslError) as err:
        parse_app(doc(ref="ghost"), "app.yml")
    assert err.value.problems == ["app.yml:9: node x (answer): reference 'ghost.text' names no node"]


def test_missing_mode_and_chat_apps_refused() -> None:
    with pytest.raises(DslError, match=r"app\.mode 'chat'"):
        parse_app(doc().replace("mode: workflow", "mode: chat"))
    with pytest.raises(DslError, match="missing app data"):
        parse_app('version: "0.5.0"\nkind: app\n')


def test_example_round_trips_unchanged() -> None:
    app = parse_app(EXAMPLE.read_text(), str(EXAMPLE))
    assert app.status is ImportStatus.COMPLETED and len(app.nodes) == 12
    exported = export_app(app)
    assert yaml.safe_load(exported) == yaml.safe_load(EXAMPLE.read_text())
    assert export_app(parse_app(exported)) == exported


ITERATION = """\
version: "0.5.0"
kind: app
app: {name: t, mode: workflow}
workflow:
  graph:
    nodes:
    - id: start
      data: {type: start, title: Start, variables: []}
    - id: each
      data: {type: iteration, title: Each, iterator_selector: [start, items], output_selector: [say, output]}
    - id: each_start
      parentId: each
      data: {type: iteration-start, title: ''}
    - id: say
      parentId: each
      data: {type: template-transform, title: Say, template: "{{ x }}", variables: []}
    edges:
    - {source: start, target: each}
    - {source: each_start, target: say}
"""


def test_iteration_child_that_no_edge_reaches_is_an_error_with_its_line() -> None:
    assert set(parse_app(ITERATION).nodes) == {"start", "each", "each_start", "say"}   # connected: fine
    with pytest.raises(DslError) as err:
        parse_app(ITERATION.replace("    - {source: each_start, target: say}\n", ""), "app.yml")
    assert err.value.problems == ["app.yml:14: node say (template-transform): inside iteration each, but no edge "
                                  "path from its iteration-start each_start reaches it, so it would never run"]


def test_iteration_needs_one_iteration_start_and_children_an_iteration_parent() -> None:
    no_start = ITERATION.replace("data: {type: iteration-start, title: ''}", "data: {type: code, title: ''}")
    with pytest.raises(DslError) as err:
        parse_app(no_start, "app.yml")
    assert err.value.problems == ["app.yml:9: node each (iteration): needs exactly one iteration-start child "
                                  "(a node with parentId each and type iteration-start), found 0"]
    with pytest.raises(DslError) as err:
        parse_app(ITERATION.replace("parentId: each\n      data: {type: template", "parentId: start\n      "
                                    "data: {type: template"), "app.yml")
    assert err.value.problems == ["app.yml:14: node say (template-transform): its parent 'start' is not an "
                                  "iteration node"]
