"""Top-k sampling by partial selection (engine/sampling.py): the k-th largest probability is the cut-off
a full sort gave, per row, in a batch that mixes k values, no limit and greedy rows."""

from __future__ import annotations

import torch

from inferstack.engine.sampling import SamplingRow, sample
from inferstack.engine.sampling_params import SamplingParams


def _row(seed: int, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(max_tokens=1, **params), [1], [], torch.Generator().manual_seed(seed))


def test_top_k_keeps_exactly_the_k_most_likely_tokens_per_row():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = logits[:, 11] = 4.0                  # a tie at the top: both must stay reachable
    seen: list[set[int]] = [set(), set(), set()]
    for seed in range(60):
        rows = [_row(seed, temperature=1.0, top_k=3), _row(seed, temperature=1.0), _row(seed, temperature=0)]
        tokens, _ = sample(logits.clone(), rows)
        for i, t in enumerate(tokens):
            seen[i].add(t)
    top3 = set(logits[0].topk(3).indices.tolist())
    assert seen[0] == top3 and {7, 11} <= top3           # every kept token drawn, nothing else
    assert len(seen[1]) > 20                             # no limit: the whole distribution
    assert seen[2] == {int(logits[2].argmax())}
