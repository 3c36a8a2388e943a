"""Adaptive temperature scaling (probunlearn.temperature, SPEC §2, [P1]) on the tiny random Llama of
tests/tiny_lm.py: both readings (entropy rule and confidence rule), their two branches, fire counts,
calibration of h_tau, replay, and that logits processors only see rows still generating."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_lm import tiny_model, tiny_tokenizer

from probunlearn.sampling import greedy_answers, sample_answers, sample_token_ids
from probunlearn.temperature import (AdaptiveTemperature, ConfidenceTemperature, EntropyRecorder, calibrate_threshold,
                                     next_token_entropy, threshold_from_entropies, top_probability)

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
    plain = sample_answers(model, tokenizer, QUESTIONS, num_samples=6, max_new_tokens=MAX_NEW, seed=3, progress=False)
    always = AdaptiveTemperature(threshold=1e9)
    forced = sample_answers(model, tokenizer, QUESTIONS, num_samples=6, max_new_tokens=MAX_NEW, seed=3, progress=False,
                            logits_processors=[always])
    greedy = greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=MAX_NEW, progress=False)
    assert forced == [[g] * 6 for g in greedy]
    assert always.fired == always.steps > 0 and always.fire_rate == 1.0
    never = AdaptiveTemperature(threshold=0.0)  # entropies are >= 0: the low branch never fires
    assert sample_answers(model, tokenizer, QUESTIONS, num_samples=6, max_new_tokens=MAX_NEW, seed=3, progress=False,
                          logits_processors=[never]) == plain
    assert never.fired == 0 and never.steps > 0
    never.reset()
    assert never.steps == 0 and math.isnan(never.fire_rate)


def test_processors_see_only_rows_still_generating(lm):
    model, tokenizer = lm
    recorder = EntropyRecorder()
    ids = sample_token_ids(model, tokenizer, QUESTIONS, num_samples=8, max_new_tokens=MAX_NEW, seed=1, progress=False,
                           logits_processors=[recorder], batch_size=5)
    # a row that stopped at EOS decoded len + 1 steps (EOS is not returned); a cut row MAX_NEW steps
    expected = sum(min(len(row) + 1, MAX_NEW) for rows in ids for row in rows)
    assert recorder.entropies.size == expected
    assert any(len(row) < MAX_NEW - 1 for rows in ids for row in rows)  # some rows did stop early


def test_calibration_is_the_quantile_of_retain_entropies(lm):
    model, tokenizer = lm
    calibration = calibrate_threshold(model, tokenizer, QUESTIONS, quantile=0.05, num_samples=8, max_new_tokens=MAX_NEW,
                                      progress=False)
    entropies = calibration["entropies"]
    assert calibration["steps"] == entropies.size > 20
    assert calibration["threshold"] == pytest.approx(float(np.quantile(entropies, 0.05, method="lower")))
    assert (entropies < calibration["threshold"]).mean() <= 0.05
    assert threshold_from_entropies(entropies, 0.5)["threshold"] == pytest.approx(float(np.quantile(entropies, 0.5, method="lower")))
    # on the questions it was calibrated on, the low branch fires rarely (~5 % of steps; not exactly,
    # because once it fires the answer continues differently from the calibration run)
    processor = AdaptiveTemperature(calibration["threshold"])
    sample_answers(model, tokenizer, QUESTIONS, num_samples=8, max_new_tokens=MAX_NEW, progress=False,
                   logits_processors=[processor])
    assert 0 < processor.fire_rate <= 0.1
    with pytest.raises(ValueError, match="quantile"):
        calibrate_threshold(model, tokenizer, QUESTIONS, quantile=1.5)


def _splits():
    from datasets import Dataset

    split = lambda qs: Dataset.from_list([{"question": q, "answer": "the answer is here", "keywords": ["here"]}
                                          for q in qs])
    return {"forget": split(QUESTIONS[:2]), "retain": split(QUESTIONS[1:])}


def test_evaluate_adaptive_calibrates_on_retain_and_reports_fire_rates(lm):
    from probunlearn.temperature import evaluate_adaptive

    model, tokenizer = lm
    splits = _splits()
    out = evaluate_adaptive(model, tokenizer, splits, quantile=0.2, num_samples=4, max_new_tokens=MAX_NEW,
                            progress=False)
    assert set(out["adaptive"]) == {"entropy", "confidence"} and out["threshold"]["confidence"] == 0.9
    assert out["threshold"]["entropy"] == pytest.approx(float(np.quantile(out["entropies"]["retain"], 0.2, method="lower")))
    for reading in ("entropy", "confidence"):
        assert set(out["fire_rate"][reading]) == {"forget", "retain"}
        assert all(0 <= r <= 1 for r in out["fire_rate"][reading].values())
        assert set(out["redrawn"][reading]) == {"forget", "retain"} and all(0 <= r <= 1 for r in out["redrawn"][reading].values())
        for name in splits:
            plain, adaptive = out["plain"][name][0], out["adaptive"][reading][name][0]
            assert plain["greedy"].tolist() == adaptive["greedy"].tolist()  # the low branch keeps the argmax
            assert out["adaptive"][reading][name][1]["scores"].shape == (len(splits[name]), 4)
    assert out["fire_rate"]["entropy"]["retain"] > 0
    with pytest.raises(ValueError, match="calibrate_on"):
        evaluate_adaptive(model, tokenizer, splits, calibrate_on="utility", num_samples=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="readings"):
        evaluate_adaptive(model, tokenizer, splits, readings=["greedy"], num_samples=2, max_new_tokens=4)


@pytest.mark.parametrize("quantile, low_temperature, confidence", [(0.3, 0.0, 0.3), (0.3, 0.5, 0.25), (0.01, 0.0, 0.33)])
def test_replay_gives_the_answers_and_fire_rates_of_a_full_second_pass(lm, quantile, low_temperature, confidence):
    """evaluate_adaptive decodes again only the answers a reading could change; on the float32
    tiny model (answers independent of batch shape) that must equal a full adaptive pass exactly."""
    from probunlearn.temperature import evaluate_adaptive

    model, tokenizer = lm
    splits = _splits()
    kwargs = dict(quantile=quantile, low_temperature=low_temperature, confidence_threshold=confidence, num_samples=6,
                  max_new_tokens=MAX_NEW, seed=3, batch_size=7, progress=False)
    fast = evaluate_adaptive(model, tokenizer, splits, **kwargs)
    full = evaluate_adaptive(model, tokenizer, splits, replay=False, **kwargs)
    assert fast["threshold"] == full["threshold"]
    for reading in ("entropy", "confidence"):
        for name in splits:
            assert fast["adaptive"][reading][name][1]["samples"] == full["adaptive"][reading][name][1]["samples"]
            assert fast["adaptive"][reading][name][0].equals(full["adaptive"][reading][name][0])
            assert fast["fire_rate"][reading][name] == pytest.approx(full["fire_rate"][reading][name])
        changed = sum(a != b for name in splits for rows_a, rows_b in zip(fast["plain"][name][1]["samples"],
                                                                          fast["adaptive"][reading][name][1]["samples"])
                      for a, b in zip(rows_a, rows_b))
        if reading == "confidence" or quantile > 0.1:  # the low branch fires often enough that some answers change
            assert changed > 0 and fast["redrawn"][reading]["forget"] > 0
        if low_temperature == 0:  # only answers that left the argmax where it fired are redrawn, not all
            assert fast["redrawn"][reading]["forget"] < 1
        assert changed <= sum(round(fast["redrawn"][reading][name] * len(splits[name]) * 6) for name in splits)


def test_confidence_rule_is_greedy_at_threshold_zero_and_plain_sampling_at_one(lm):
    model, tokenizer = lm
    kwargs = dict(num_samples=6, max_new_tokens=MAX_NEW, seed=3, progress=False)
    plain = sample_answers(model, tokenizer, QUESTIONS, **kwargs)
    greedy = greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=MAX_NEW, progress=False)
    always = ConfidenceTemperature(threshold=0.0)  # c_t > 0 at every step
    assert sample_answers(model, tokenizer, QUESTIONS, logits_processors=[always], **kwargs) == [[g] * 6 for g in greedy]
    assert always.fired == always.steps > 0 and always.fire_rate == 1.0
    never = ConfidenceTemperature(threshold=1.0)  # c_t <= 1 always
    assert sample_answers(model, tokenizer, QUESTIONS, logits_processors=[never], **kwargs) == plain
    assert never.fired == 0 and never.steps > 0
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceTemperature(float("inf"))


def test_confidence_is_the_running_mean_of_the_top_token_probability_per_answer():
    """Outside the sampler (no per-row state) the confidence is the step's own top probability;
    with state, the mean over the answer's steps so far; a row never sees another row's history."""
    from probunlearn.processors import DecodingStep

    sure, unsure = torch.tensor([[9.0, 0.0, 0.0]]), torch.tensor([[0.3, 0.0, 0.0]])
    p_sure, p_unsure = (float(top_probability(x)[0]) for x in (sure, unsure))
    rule = ConfidenceTemperature(threshold=0.6)
    info = DecodingStep(step=0, weights=torch.tensor([3, 1]), state=rule.initial_state(2, "cpu"))
    out = rule(None, torch.cat([sure, unsure]), info)
    assert torch.isinf(out[0, 1:]).all() and torch.equal(out[1], unsure[0])  # row 0 greedy, row 1 untouched
    assert rule.fired == 3 and rule.steps == 4  # weighted by the answers each row stands for
    assert info.state[:, 0].tolist() == pytest.approx([p_sure, p_unsure]) and info.state[:, 1].tolist() == [1, 1]
    # step 2: row 0 turns unsure, but its running mean (p_sure + p_unsure) / 2 > 0.6 still decides: greedy
    assert p_unsure < 0.6 < (p_sure + p_unsure) / 2
    info.step, info.weights = 1, torch.tensor([1, 1])
    out = rule(None, torch.cat([unsure, unsure]), info)
    assert torch.isinf(out[0, 1:]).all() and torch.equal(out[1], unsure[0])
    assert info.state[:, 1].tolist() == [2, 2]


def test_confidence_rule_answers_do_not_depend_on_batch_size(lm):
    model, tokenizer = lm
    kwargs = dict(num_samples=7, max_new_tokens=MAX_NEW, seed=5, progress=False)
    answers = [sample_token_ids(model, tokenizer, QUESTIONS, batch_size=b, logits_processors=[ConfidenceTemperature(0.4)],
                                **kwargs) for b in (1, 5, 1000)]
    assert answers[0] == answers[1] == answers[2]
    plain = sample_token_ids(model, tokenizer, QUESTIONS, **kwargs)
    assert answers[0] != plain  # the rule did change something


def test_running_confidence_of_a_trace_matches_the_processor():
    from probunlearn.temperature import StepTrace

    trace = StepTrace()
    logits = [torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    trace(np.array([0, 1]), np.array([0, 0]), 0, logits[0], torch.tensor([0, 1]), torch.tensor([0, 1]))
    trace(np.array([0]), np.array([0]), 1, logits[1], torch.tensor([0]), torch.tensor([1]))
    top = torch.softmax(torch.tensor([4.0, 0.0]), 0)[0].item()
    assert trace.running_confidence().tolist() == pytest.approx([top, 0.5, (top + 0.5) / 2])
    assert trace.rows_to_redraw(ConfidenceTemperature(0.7)) == ([(0, 0)] if (top + 0.5) / 2 > 0.7 else [])
    assert trace.low_steps(ConfidenceTemperature(0.7)) == (1 + ((top + 0.5) / 2 > 0.7), 3)


def test_step_trace_flags_only_rows_that_left_the_argmax_below_the_threshold():
    from probunlearn.temperature import StepTrace

    trace = StepTrace()
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # answers: (0, 0) took the argmax, (0, 1) did not, (1, 0) is uniform (no unique argmax), (1, -1) greedy;
    # answers (0, *) and (1, -1) share the first prefix row
    trace(np.array([0, 0, 1, 1]), np.array([0, 1, 0, -1]), 0, logits, torch.tensor([0, 0, 1, 0]),
          torch.tensor([0, 1, 2, 0]))
    low = float(next_token_entropy(logits[:1])[0]) + 1e-3
    assert trace.rows_to_redraw(low) == [(0, 1)]
    assert trace.rows_to_redraw(low, low_temperature=0.5) == [(0, 0), (0, 1)]
    assert trace.rows_to_redraw(2.0) == [(0, 1), (1, 0)]
    assert trace.low_steps(low) == (3, 4) and trace.low_steps(low, skip=[(0, 1)]) == (2, 3)
    assert trace.entropies.shape == (4,)


def test_a_sweep_replays_each_setting_as_the_reading_itself_would(lm):
    """A swept setting is the reading at that setting, from the same plain pass: the sweep's tables
    and fire rates equal those of evaluate_adaptive run with that setting as its own."""
    from probunlearn.comparison import sweep_table
    from probunlearn.temperature import evaluate_adaptive

    model, tokenizer = lm
    splits = _splits()
    kwargs = dict(num_samples=5, max_new_tokens=MAX_NEW, seed=2, progress=False)
    out = evaluate_adaptive(model, tokenizer, splits, quantile=0.05, confidence_threshold=0.9,
                            sweep={"entropy": [0.4], "confidence": [0.3]}, **kwargs)
    alone = evaluate_adaptive(model, tokenizer, splits, quantile=0.4, confidence_threshold=0.3, **kwargs)
    by_reading = {entry["reading"]: entry for entry in out["sweep"]}
    assert set(by_reading) == {"entropy", "confidence"} and by_reading["confidence"]["threshold"] == 0.3
    for reading, entry in by_reading.items():
        assert entry["threshold"] == pytest.approx(alone["threshold"][reading])
        for name in splits:
            assert entry["tables"][name].equals(alone["adaptive"][reading][name][0])
            assert entry["fire_rate"][name] == pytest.approx(alone["fire_rate"][reading][name])
    table = sweep_table(out)
    assert len(table) == 1 + 2 + 2 and table["reading"].tolist().count("plain") == 1
    swept = table[(table["reading"] == "entropy") & (table["setting"] == 0.4)].iloc[0]
    assert swept["forget_leak_rate"] == pytest.approx(alone["adaptive"]["entropy"]["forget"][0]["leak_rate"].mean())
    assert table.loc[table["reading"] == "plain", "forget_fire_rate"].iloc[0] == 0
    with pytest.raises(ValueError, match="replay"):
        evaluate_adaptive(model, tokenizer, splits, replay=False, sweep={"entropy": [0.5]}, **kwargs)
