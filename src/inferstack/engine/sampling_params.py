"""Per-request sampling parameters (vLLM's meanings), validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferstack.engine.structured.spec import GrammarSpec


class SamplingParamError(ValueError):
    """An invalid sampling value; ``param`` names the offending field for the HTTP error envelope."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # special tokens kept in the text even when skipping the others (a tool-call marker the parser reads)
    keep_special_ids: frozenset[int] = frozenset()
    structured_outputs: GrammarSpec | None = None    # constrain the output (docs/structured-outputs.md)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self._check(self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        self._check(self.temperature >= 0, "temperature", f"temperature must be >= 0, got {self.temperature}")
        self._check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        self._check(self.top_k == -1 or self.top_k >= 1, "top_k", f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        self._check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        self._check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
                    f"max_tokens must be at least 1, got {self.max_tokens}")
        self._check(self.min_tokens >= 0, "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        self._check(-2 <= self.presence_penalty <= 2, "presence_penalty",
                    f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        self._check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
                    f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self._check(self.repetition_penalty > 0, "repetition_penalty",
                    f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        self._check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs",
                    f"logprobs must be in [0, 20], got {self.logprobs}")
        self._check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop must be non-empty strings")
        self._check(len(self.stop) <= 16, "stop", "at most 16 stop strings are allowed")
        self._check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                    "stop_token_ids must be non-negative integers")

    @staticmethod
    def _check(ok: bool, param: str, message: str) -> None:
        if not ok:
            raise SamplingParamError(param, message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
