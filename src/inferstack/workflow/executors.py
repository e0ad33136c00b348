"""The executor of each node type the runner runs."""

from __future__ import annotations

from inferstack.workflow.nodes import (
    Answer,
    Code,
    End,
    Executor,
    HttpRequest,
    IfElse,
    Llm,
    Passthrough,
    Start,
    TemplateTransform,
    Tool,
    VariableAggregator,
)
from inferstack.workflow.structured import ParameterExtractor, QuestionClassifier

EXECUTORS: dict[str, Executor] = {
    "start": Start(), "llm": Llm(), "code": Code(), "template-transform": TemplateTransform(),
    "if-else": IfElse(), "variable-aggregator": VariableAggregator(), "answer": Answer(), "end": End(),
    "http-request": HttpRequest(), "iteration-start": Passthrough(), "tool": Tool(),
    "parameter-extractor": ParameterExtractor(), "question-classifier": QuestionClassifier(),
}
