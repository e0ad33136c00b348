"""KAgent manifests validated offline: KAgent's CRD rules (enums, MaxItems, CEL messages), strict unknown
fields and reference checks, each problem at the file:line it comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferstack.agents.manifest import ManifestError, load_bundle

EXAMPLE = Path(__file__).resolve().parents[2] / "src/inferstack/assets/agents/glossary-team.yaml"


def agent(name: str, declarative: str, extra_spec: str = "", agent_type: str = "Declarative") -> str:
    return (f"apiVersion: kagent.dev/v1alpha2\nkind: Agent\nmetadata:\n  name: {name}\nspec:\n  type: {agent_type}\n"
            f"{extra_spec}  declarative:\n    systemMessage: hi\n{declarative}")


def problems(tmp_path: Path, *docs: str) -> list[str]:
    path = tmp_path / "agents.yaml"
    path.write_text("---\n".join(docs))
    with pytest.raises(ManifestError) as err:
        load_bundle([path])
    return [p.replace(str(path), "F") for p in err.value.problems]


def test_shipped_example_is_valid() -> None:
    bundle = load_bundle([EXAMPLE])
    explainer = bundle.get("Agent", "explainer", "default")
    assert explainer is not None and explainer.spec.declarative.tools[0].agent.name == "researcher"
    assert bundle.get("ModelConfig", "smollm2", "default").spec.model == "smollm2-135m"
    server = bundle.get("MCPServer", "glossary", "default")
    assert server.spec.deployment.args[-1] == "inferstack.agents.glossary_server"


def test_cel_rules_with_kagents_messages_and_lines(tmp_path: Path) -> None:
    tools = ("    tools:\n"
             "    - type: Agent\n"                                  # line 10
             "      mcpServer: {name: x}\n"
             "    - type: McpServer\n"                              # line 12
             "    - type: Robot\n"                                  # line 13
             "      agent: {name: y}\n")
    got = problems(tmp_path, agent("a", tools))
    assert got == [
        "F:10: Agent/a: spec.declarative.tools[0]: type.mcpServer must be nil if the type is not McpServer",
        "F:12: Agent/a: spec.declarative.tools[1]: type.mcpServer must be specified for McpServer filter.type",
        "F:13: Agent/a: spec.declarative.tools[2].type: Input should be 'McpServer' or 'Agent'",
    ]


def test_type_exclusivity_unknown_fields_and_limits(tmp_path: Path) -> None:
    byo = ("apiVersion: kagent.dev/v1alpha2\nkind: Agent\nmetadata: {name: b}\nspec:\n  type: BYO\n"
           "  declarative: {systemMessage: x}\n")
    got = problems(tmp_path, byo)
    assert got == ["F:5: Agent/b: spec: declarative must be specified if type is Declarative, or byo must be "
                   "specified if type is BYO"]
    both = agent("c", "    systemMessageFrom: {type: ConfigMap, name: m, key: k}\n    temprature: 3\n")
    assert problems(tmp_path, both) == [
        'F:10: Agent/c: spec.declarative.temprature: unknown field "spec.declarative.temprature"']
    many = "    tools:\n" + "".join(f"    - {{type: Agent, agent: {{name: t{i}}}}}\n" for i in range(21))
    assert "List should have at most 20 items after validation, not 21" in problems(tmp_path, agent("d", many))[0]
    assert problems(tmp_path, agent("Bad_Name", ""))[0].startswith(
        "F:4: Agent: metadata.name 'Bad_Name' must be a lowercase RFC 1123 subdomain")


def test_system_message_exclusive(tmp_path: Path) -> None:
    got = problems(tmp_path, agent("e", "    systemMessageFrom: {type: ConfigMap, name: m, key: k}\n"))
    assert got == ["F:8: Agent/e: spec.declarative: systemMessage and systemMessageFrom are mutually exclusive"]


def test_agent_references_must_exist_and_not_loop(tmp_path: Path) -> None:
    calls = lambda target: f"    tools:\n    - type: Agent\n      agent: {{name: {target}}}\n"  # noqa: E731
    assert problems(tmp_path, agent("a", calls("ghost"))) == [
        "F:11: Agent/a: spec.declarative.tools[0].agent: agent default/ghost is not defined in F"]
    got = problems(tmp_path, agent("a", calls("b")), agent("b", calls("c")), agent("c", calls("a")))
    assert got == ["F:10: agents call each other in a cycle: a -> b -> c -> a"]
    other_ns = agent("a", "    tools:\n    - type: Agent\n      agent: {name: b, namespace: team}\n")
    b_in_team = agent("b", "").replace("name: b\n", "name: b\n  namespace: team\n")
    assert "does not allow namespace default" in problems(tmp_path, other_ns, b_in_team)[0]


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from inferstack.cli.main import app

    good = CliRunner().invoke(app, ["agent", "validate", str(EXAMPLE)])
    assert good.exit_code == 0 and "ok: 2 Agent, 1 MCPServer, 1 ModelConfig" in good.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(agent("a", "    tools:\n    - type: Agent\n"))
    out = CliRunner().invoke(app, ["agent", "validate", str(bad)])
    assert out.exit_code == 2
    assert f"{bad}:10: Agent/a: spec.declarative.tools[0]: type.agent must be specified for Agent filter.type" in \
        out.output
