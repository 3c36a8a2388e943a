"""Exact draws (probunlearn.draws): every top-p path of the next-token draw, no token of probability 0, and
exponential, keyed race noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from probunlearn import draws
from probunlearn.stats import chi_square_p

P_MIN = 1e-3  # chi-square: seeded, so a pass is deterministic; this level only guards against bugs


def test_next_token_large_vocabulary_every_top_p_path():
    """next_token on a 5000-token vocabulary with nuclei inside the first 256 candidates, inside
    the first 4096, and larger (full sort); membership and frequencies, and top_p = 1."""
    gen = torch.Generator().manual_seed(0)
    vocab, rows = 5000, 3000
    rng = np.random.default_rng(0)
    sizes = []
    for scale, top_p in ((4.0, 0.9), (1.5, 0.9), (0.1, 0.95), (4.0, 1.0)):
        logits = torch.randn(vocab, generator=gen) * scale
        keys = rng.integers(0, 2**63, size=rows, dtype=np.uint64)
        tokens = draws.next_token(logits.expand(rows, -1).clone(), keys, 0, temperature=1.0, top_p=top_p).numpy()
        probs = torch.softmax(logits.double(), 0).numpy()
        order = np.argsort(-probs)
        before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        nucleus = order[before < top_p]
        sizes.append(len(nucleus))
        assert np.isin(tokens, nucleus).all()
        truncated = np.zeros(vocab)
        truncated[nucleus] = probs[nucleus] / probs[nucleus].sum()
        if len(nucleus) < 200:
            assert chi_square_p(np.bincount(tokens, minlength=vocab), truncated) > P_MIN
        else:  # too many categories for 3000 draws: compare the mass of 20 groups of tokens
            groups = np.arange(vocab) % 20
            observed = np.bincount(groups[tokens], minlength=20)
            assert chi_square_p(observed, np.bincount(groups, weights=truncated, minlength=20)) > P_MIN
    assert sizes[0] < 256 < sizes[1] < 4096 < sizes[2]  # every path was taken


def test_next_token_never_picks_zero_probability_tokens():
    logits = torch.full((4, 700), -float("inf"))
    logits[0, 5] = 0.0
    logits[1, [255, 256, 699]] = torch.tensor([1.0, -3.0, 2.0])  # across block borders
    logits[2, 0] = 0.0
    logits[3, 699] = 0.0
    keys = np.arange(4, dtype=np.uint64)
    for step in range(50):
        tokens = draws.next_token(logits, keys, step)
        assert tokens[0] == 5 and tokens[1] in (255, 256, 699) and tokens[2] == 0 and tokens[3] == 699
    with pytest.raises(ValueError, match="no finite logit"):
        draws.next_token(torch.full((1, 700), -float("inf")), keys[:1], 0)


def test_race_noise_is_exponential_and_keyed():
    keys = draws.row_keys(0, ["a"] * 500, range(500))
    blocks, tokens = draws.race_noise(keys, 3, num_blocks=10)
    assert blocks.shape == (500, 10) and tokens.shape == (500, 256) and (blocks > 0).all()
    noise = np.concatenate([blocks.ravel(), tokens.ravel()])
    assert stats.kstest(noise, "expon").pvalue > P_MIN
    again = draws.race_noise(draws.row_keys(0, ["a"], [7]), 3, num_blocks=10)
    np.testing.assert_array_equal(again[0], blocks[7:8])
    assert not np.array_equal(draws.race_noise(draws.row_keys(1, ["a"], [7]), 3, 10)[0], blocks[7:8])
    assert not np.array_equal(draws.race_noise(draws.row_keys(0, ["b"], [7]), 3, 10)[0], blocks[7:8])
    assert not np.array_equal(draws.race_noise(keys[7:8], 4, 10)[0], blocks[7:8])  # a new step, new noise
    assert len(set(keys.tolist())) == 500


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.0, 0.9)])
def test_draw_leaves_the_callers_scores_and_reads_only_the_rows_used(temperature, top_p):
    """The logits a step observer sees after the draw are the model's: the temperature divides a copy,
    and the nucleus is cut from the draw's own probabilities, in place. Rows no answer draws from
    (even NaN ones, e.g. rows only greedy answers take) are never read."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(4, 600, generator=gen)
    scores[2] = float("nan")
    before = scores.clone()
    keys = np.arange(5, dtype=np.uint64) * np.uint64(7919)
    rows = torch.tensor([0, 3, 3, 1, 0])
    tokens = draws.draw(scores, rows, keys, 0, temperature=temperature, top_p=top_p)
    assert torch.equal(scores.isnan(), before.isnan()) and torch.equal(scores[[0, 1, 3]], before[[0, 1, 3]])
    alone = torch.cat([draws.draw(scores[[r]], torch.tensor([0]), keys[[k]], 0, temperature=temperature, top_p=top_p)
                       for k, r in enumerate(rows.tolist())])
    assert torch.equal(tokens, alone)  # each answer's token depends on its own row and key only
    finite = before[[0, 1, 3]]
    draws.draw(finite, torch.tensor([2, 0, 1, 2]), keys[:4], 1, temperature=temperature, top_p=top_p)  # every row used
    assert torch.equal(finite, before[[0, 1, 3]])
