"""row_argmax (engine/sampling.py): the blocked argmax picks exactly torch's index."""

import torch

from inferstack.engine.sampling import ARGMAX_BLOCK, SamplingRow, greedy_only, row_argmax
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.structured.manager import GrammarBitmask


def test_matches_torch_argmax_on_random_rows() -> None:
    x = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0))
    assert torch.equal(row_argmax(x), x.argmax(dim=-1))


def test_ties_nan_and_masked_rows_match_torch() -> None:
    x = torch.randn(6, 32 * ARGMAX_BLOCK, generator=torch.Generator().manual_seed(1))
    top = x[0].max() + 1
    x[0, 7 * ARGMAX_BLOCK + 5] = top            # a tie across blocks: the first one wins
    x[0, 3 * ARGMAX_BLOCK + 100] = top
    x[1, 40] = top                              # a tie inside one block
    x[1, 12] = top
    x[2, 900] = float("nan")                    # NaN counts as the largest, the first one wins
    x[2, 3000] = float("nan")
    x[3] = float("-inf")                        # a fully masked row
    x[4, 2000:2003] = float("inf")
    expected = x.argmax(dim=-1)
    assert torch.equal(row_argmax(x), expected)
    assert expected[:3].tolist() == [3 * ARGMAX_BLOCK + 100, 12, 900]


def test_odd_vocabularies_and_views_fall_back_exactly() -> None:
    g = torch.Generator().manual_seed(2)
    for vocab in (ARGMAX_BLOCK, 1000, 49153):
        x = torch.randn(5, vocab, generator=g)
        assert torch.equal(row_argmax(x), x.argmax(dim=-1))
    wide = torch.randn(4, 2 * 4096, generator=g)
    view = wide[:, ::2]                         # a strided view: reshape copies, same index
    assert torch.equal(row_argmax(view), view.argmax(dim=-1))
    assert row_argmax(torch.empty(0, 4096)).shape == (0,)


def test_greedy_only_needs_greedy_rows_without_penalties_logprobs_or_grammar() -> None:
    def row(**kw) -> SamplingRow:
        return SamplingRow(SamplingParams(**kw), [1, 2], [], None)

    plain = [row(temperature=0), row(top_k=1, temperature=0.7)]
    assert greedy_only(plain)
    assert not greedy_only([*plain, row(temperature=0.7)])
    assert not greedy_only([row(temperature=0, repetition_penalty=1.1)])
    assert not greedy_only([row(temperature=0, logprobs=0)])
    assert not greedy_only(plain, GrammarBitmask(torch.zeros(2, 1, dtype=torch.int32), [0, 1]))
