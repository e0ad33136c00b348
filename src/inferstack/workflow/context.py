"""Variable values of one run (or one iteration step) and Dify's reference syntax over them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from inferstack.workflow.dsl import TEMPLATE_REF


@dataclass
class RunContext:
    """Node outputs by node id; an iteration step sees its parent's values too."""

    values: dict[str, dict[str, Any]] = field(default_factory=dict)
    parent: RunContext | None = None

    def child(self, **scoped: dict[str, Any]) -> RunContext:
        return RunContext(values=dict(scoped), parent=self)

    def node_outputs(self, node_id: str) -> dict[str, Any] | None:
        ctx: RunContext | None = self
        while ctx is not None:
            if node_id in ctx.values:
                return ctx.values[node_id]
            ctx = ctx.parent
        return None

    def get(self, selector: Sequence[str]) -> Any:
        """The value at ``[node_id, var, field...]``; None when that node did not run (a skipped branch)."""
        value: Any = self.node_outputs(selector[0])
        for part in selector[1:]:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return value

    def render(self, template: str) -> str:
        """Replace every ``{{#node.var#}}`` with its value (objects and lists as JSON)."""
        return TEMPLATE_REF.sub(lambda m: as_text(self.get(m.group(1).split("."))), template)


def as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)
