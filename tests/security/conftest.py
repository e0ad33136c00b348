"""One real engine process for the replayed engine-side probes (emulated model, real tokenizer and
HTTP stack): a decode-role engine with a transfer secret and one-second header and body deadlines."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.support.procs import Server, inferstack_env, start_inferstack

TRANSFER_SECRET = "stack-secret"


@pytest.fixture(scope="session")
def engine() -> Iterator[Server]:
    srv = start_inferstack(["engine", "serve", "--emulate", "cpu:smollm2-135m", "--role", "decode",
                            "--header-timeout", "1", "--body-timeout", "1"],
                           env=inferstack_env(INFERSTACK_KV_TRANSFER_SECRET=TRANSFER_SECRET))
    yield srv
    srv.stop()
