"""Adaptive temperature scaling (probunlearn.temperature, SPEC §2, [P1]) on the tiny random Llama of
tests/tiny_lm.py: the processor's two branches, its fire counts, calibration of h_tau, and that
logits processors only see rows still generating."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_lm import tiny_model, tiny_tokenizer

from probunlearn.sampling import greedy_answers, sample_answers, sample_token_ids
from probunlearn.temperature import (AdaptiveTemperature, EntropyRecorder, calibrate_threshold, next_token_entropy,
                                     threshold_from_entropies)

QUESTIONS = ["hi", "what is the name of the author?", "where?"]
MAX_NEW = 12


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


@pytest.fixture(scope="module")
def lm():
    return tiny_model(), tiny_tokenizer()


def test_next_token_entropy_closed_forms():
    scores = torch.tensor([[0.0] * 8, [5.0] + [float("-inf")] * 7, [0.0, 0.0] + [float("-inf")] * 6])
    np.testing.assert_allclose(next_token_entropy(scores).numpy(), [math.log(8), 0.0, math.log(2)], atol=1e-6)


def test_low_branch_is_greedy_or_rescaled_and_high_branch_untouched():
    scores = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.2, 0.0]])  # low, high entropy
    threshold = float(next_token_entropy(scores).mean())
    greedy = AdaptiveTemperature(threshold)(None, scores)
    assert torch.isinf(greedy[0, 1:]).all() and greedy[0, 0] == 4.0
    assert torch.equal(greedy[1], scores[1])
    scaled = AdaptiveTemperature(threshold, low_temperature=0.5, temperature=2.0)(None, scores)
    assert torch.allclose(scaled[0] / 2.0, scores[0] / 0.5)  # after the sampler divides by T: logits / T_low
    assert torch.equal(scaled[1], scores[1])
    with pytest.raises(ValueError, match="threshold"):
        AdaptiveTemperature(float("nan"))


def test_always_firing_is_greedy_and_never_firing_is_plain_sampling(lm):
    model, tokenizer = lm
    plain = sample_answers(model, tokenizer, QUESTIONS, n=6, max_new_tokens=MAX_NEW, seed=3, progress=False)
    always = AdaptiveTemperature(threshold=1e9)
    forced = sample_answers(model, tokenizer, QUESTIONS, n=6, max_new_tokens=MAX_NEW, seed=3, progress=False,
                            logits_processors=[always])
    greedy = greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=MAX_NEW, progress=False)
    assert forced == [[g] * 6 for g in greedy]
    assert always.fired == always.steps > 0 and always.fire_rate == 1.0
    never = AdaptiveTemperature(threshold=0.0)  # entropies are >= 0: the low branch never fires
    assert sample_answers(model, tokenizer, QUESTIONS, n=6, max_new_tokens=MAX_NEW, seed=3, progress=False,
                          logits_processors=[never]) == plain
    assert never.fired == 0 and never.steps > 0
    never.reset()
    assert never.steps == 0 and math.isnan(never.fire_rate)


def test_processors_see_only_rows_still_generating(lm):
    model, tokenizer = lm
    recorder = EntropyRecorder()
    ids = sample_token_ids(model, tokenizer, QUESTIONS, n=8, max_new_tokens=MAX_NEW, seed=1, progress=False,
                           logits_processors=[recorder], batch_size=5)
    # a row that stopped at EOS decoded len + 1 steps (EOS is not returned); a cut row MAX_NEW steps
    expected = sum(min(len(row) + 1, MAX_NEW) for rows in ids for row in rows)
    assert recorder.entropies.size == expected
    assert any(len(row) < MAX_NEW - 1 for rows in ids for row in rows)  # some rows did stop early


def test_calibration_is_the_quantile_of_retain_entropies(lm):
    model, tokenizer = lm
    calibration = calibrate_threshold(model, tokenizer, QUESTIONS, quantile=0.05, n=8, max_new_tokens=MAX_NEW,
                                      progress=False)
    entropies = calibration["entropies"]
    assert calibration["steps"] == entropies.size > 20
    assert calibration["threshold"] == pytest.approx(float(np.quantile(entropies, 0.05, method="lower")))
    assert (entropies < calibration["threshold"]).mean() <= 0.05
    assert threshold_from_entropies(entropies, 0.5)["threshold"] == pytest.approx(float(np.quantile(entropies, 0.5, method="lower")))
    # on the questions it was calibrated on, the low branch fires rarely (~5 % of steps; not exactly,
    # because once it fires the answer continues differently from the calibration run)
    processor = AdaptiveTemperature(calibration["threshold"])
    sample_answers(model, tokenizer, QUESTIONS, n=8, max_new_tokens=MAX_NEW, progress=False,
                   logits_processors=[processor])
    assert 0 < processor.fire_rate <= 0.1
    with pytest.raises(ValueError, match="quantile"):
        calibrate_threshold(model, tokenizer, QUESTIONS, quantile=1.5)


def test_evaluate_adaptive_calibrates_on_retain_and_reports_fire_rates(lm):
    from datasets import Dataset

    from probunlearn.temperature import evaluate_adaptive

    model, tokenizer = lm
    split = lambda qs: Dataset.from_list([{"question": q, "answer": "the answer is here", "keywords": ["here"]}
                                          for q in qs])
    splits = {"forget": split(QUESTIONS[:2]), "retain": split(QUESTIONS[1:])}
    out = evaluate_adaptive(model, tokenizer, splits, quantile=0.2, num_samples=4, max_new_tokens=MAX_NEW,
                            progress=False)
    assert out["threshold"] == pytest.approx(float(np.quantile(out["entropies"]["retain"], 0.2, method="lower")))
    assert set(out["fire_rate"]) == {"forget", "retain"} and all(0 <= r <= 1 for r in out["fire_rate"].values())
    assert out["fire_rate"]["retain"] > 0
    for name in splits:
        plain, adaptive = out["plain"][name][0], out["adaptive"][name][0]
        assert plain["greedy"].tolist() == adaptive["greedy"].tolist()  # the low branch keeps the argmax
        assert out["adaptive"][name][1]["scores"].shape == (len(splits[name]), 4)
    assert set(out["redrawn"]) == {"forget", "retain"} and all(0 <= r <= 1 for r in out["redrawn"].values())
    with pytest.raises(ValueError, match="calibrate_on"):
        evaluate_adaptive(model, tokenizer, splits, calibrate_on="utility", num_samples=2, max_new_tokens=4)


@pytest.mark.parametrize("quantile, low_temperature", [(0.3, 0.0), (0.3, 0.5), (0.01, 0.0)])
def test_replay_gives_the_answers_and_fire_rates_of_a_full_second_pass(lm, quantile, low_temperature):
    """evaluate_adaptive decodes again only the answers the low branch could change; on the float32
    tiny model (answers independent of batch shape) that must equal a full adaptive pass exactly."""
    from datasets import Dataset

    from probunlearn.temperature import evaluate_adaptive

    model, tokenizer = lm
    split = lambda qs: Dataset.from_list([{"question": q, "answer": "the answer is here", "keywords": ["here"]}
                                          for q in qs])
    splits = {"forget": split(QUESTIONS[:2]), "retain": split(QUESTIONS[1:])}
    kwargs = dict(quantile=quantile, low_temperature=low_temperature, num_samples=6, max_new_tokens=MAX_NEW,
                  seed=3, batch_size=7, progress=False)
    fast = evaluate_adaptive(model, tokenizer, splits, **kwargs)
    full = evaluate_adaptive(model, tokenizer, splits, replay=False, **kwargs)
    assert fast["threshold"] == full["threshold"]
    for name in splits:
        assert fast["adaptive"][name][1]["samples"] == full["adaptive"][name][1]["samples"]
        assert fast["adaptive"][name][0].equals(full["adaptive"][name][0])
        assert fast["fire_rate"][name] == pytest.approx(full["fire_rate"][name])
    changed = sum(a != b for name in splits for rows_a, rows_b in zip(fast["plain"][name][1]["samples"],
                                                                      fast["adaptive"][name][1]["samples"])
                  for a, b in zip(rows_a, rows_b))
    if quantile > 0.1:  # the low branch fires often enough that some answers change
        assert changed > 0 and fast["redrawn"]["forget"] > 0
    if low_temperature == 0:  # only rows that left the argmax below h_tau are redrawn, not all
        assert fast["redrawn"]["forget"] < 1
    assert changed <= sum(round(fast["redrawn"][name] * len(splits[name]) * 6) for name in splits)


def test_step_trace_flags_only_rows_that_left_the_argmax_below_the_threshold():
    from probunlearn.temperature import StepTrace

    trace = StepTrace()
    logits = torch.tensor([[10.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    # rows: (0, 0) took the argmax, (0, 1) did not, (1, 0) is uniform (no unique argmax), (1, -1) greedy row
    trace(np.array([0, 0, 1, 1]), np.array([0, 1, 0, -1]), 0, logits, torch.tensor([0, 1, 2, 0]))
    low = float(next_token_entropy(logits[:1])[0]) + 1e-3
    assert trace.rows_to_redraw(low) == [(0, 1)]
    assert trace.rows_to_redraw(low, low_temperature=0.5) == [(0, 0), (0, 1)]
    assert trace.rows_to_redraw(2.0) == [(0, 1), (1, 0)]
    assert trace.low_steps(low) == (3, 4) and trace.low_steps(low, skip=[(0, 1)]) == (2, 3)
    assert trace.entropies.shape == (4,)
