"""`inferstack bench run` refuses contradicting flags with exit 2 and a message, before it contacts a target."""

import pytest
from typer.testing import CliRunner

from inferstack.cli.bench import app

# Nothing listens here: every case must be refused before the target is probed.
TARGET = "http://127.0.0.1:9"


@pytest.mark.parametrize(("flags", "message"), [
    (["--rate", "2", "--concurrency", "4"], "choose one of --rate, --concurrency, --sweep, --goodput"),
    (["--sweep", "--goodput", "ttft=1s"], "got --sweep and --goodput"),
    (["--rate", "1", "--endpoint", "embeddings"], "--endpoint must be chat or completions"),
    (["--rate", "1", "--no-stream", "--slo", "ttft=500ms"], "need streamed responses"),
])
def test_contradicting_flags_exit_2_with_the_reason(flags: list[str], message: str, tmp_path) -> None:
    args = ["run", "--target", TARGET, "--workload", "synthetic", "--out", str(tmp_path / "out"), *flags]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()
