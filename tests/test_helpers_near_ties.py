"""helpers.same_greedy_tokens on a fake model whose logits are known: two runs that part at a
near-tie are accepted, at a clear winner refused, and a length mismatch named. (Its divergence
path once called a helper that had been deleted: every run that parted raised NameError.)"""

from types import SimpleNamespace

import torch

from helpers import same_greedy_tokens


class FixedLogits:
    """Logits (1, seq, vocab): token 2 leads token 3 by ``gap`` at every position, all others
    far below."""

    def __init__(self, gap: float):
        self.gap = gap

    def __call__(self, ids: torch.Tensor):
        seq = ids.shape[1]
        logits = torch.full((1, seq, 5), -10.0)
        logits[..., 2] = self.gap
        logits[..., 3] = 0.0
        return SimpleNamespace(logits=logits)


def test_identical_runs_agree():
    assert same_greedy_tokens(FixedLogits(0.5), [[1, 1]], [[2, 2]], [[2, 2]], 0.01) == []


def test_parting_at_a_near_tie_is_accepted():
    # Both runs part at token 1 (2 vs 3), 0.001 logits apart: within the margin.
    assert same_greedy_tokens(FixedLogits(0.001), [[1, 1]], [[2, 3]], [[2, 2]], 0.01) == []


def test_parting_at_a_clear_winner_is_refused():
    problems = same_greedy_tokens(FixedLogits(0.5), [[1, 1]], [[2, 3]], [[2, 2]], 0.01)
    assert len(problems) == 1 and "parts at token 1" in problems[0]


def test_length_mismatch_is_named():
    problems = same_greedy_tokens(FixedLogits(0.5), [[1]], [[2, 2]], [[2]], 0.01)
    assert problems == ["prompt 0: 2 tokens against 1"]
