"""TOFU's aggregates (probunlearn.tofu) against the real TOFU eval logs and hand-made cases: truth ratio,
Prob, Forget Quality, Model Utility."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import hmean, ks_2samp

from probunlearn import tofu
from tofu_logs import FILES, MODELS, tofu_log


SPLIT_OF_FILE = {file: split for split, file in tofu.TOFU_EVAL_FILES.items()}


def field(log: dict, name: str) -> np.ndarray:
    """A stored field as an array, in stored order (as TOFU's `np.array(list(d.values()))`)."""
    return np.array(list(log[name].values()))


def tofu_truth_ratios(log: dict) -> np.ndarray:
    # aggregate_eval_stat.py: exp(mean_j average_perturb_loss - avg_paraphrased_loss)
    return np.exp(field(log, "average_perturb_loss").mean(axis=-1) - field(log, "avg_paraphrased_loss"))


def tofu_utility_numbers(model: str) -> dict[str, float]:
    out = {}
    for file in FILES:
        log, split = tofu_log(model, file), SPLIT_OF_FILE[file]
        if "eval_log" in file:
            prob = np.mean(np.exp(-field(log, "avg_gt_loss")))
        else:
            true_p = np.exp(-field(log, "avg_gt_loss"))
            false_p = np.exp(-field(log, "average_perturb_loss"))
            prob = np.mean(true_p / (true_p + false_p.sum(-1)))
        ratios = tofu_truth_ratios(log)
        if "forget" in file:
            tr_score = np.mean(np.minimum(ratios, 1 / ratios))
        else:
            tr_score = np.mean(np.maximum(0, 1 - 1 / ratios))
        out[f"{split}_prob"] = prob
        out[f"{split}_rouge"] = field(log, "rougeL_recall").mean()
        out[f"{split}_truth_ratio"] = tr_score
    return out


def our_splits(model: str) -> dict[str, dict]:
    return {SPLIT_OF_FILE[f]: tofu.split_data_from_tofu_log(tofu_log(model, f)) for f in FILES}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("file", FILES)
def test_truth_ratio_matches_tofu(model, file):
    log = tofu_log(model, file)
    data = tofu.split_data_from_tofu_log(log)
    ours = tofu.truth_ratio(data["paraphrased_nll"], data["perturbed_nll"])
    np.testing.assert_allclose(ours, tofu_truth_ratios(log), rtol=1e-12)
    # TOFU's stored per-item `truth_ratio` field is the inverse, exp(paraphrased - mean perturbed)
    # (evaluate_util.py::eval_perturbation_ratio), computed in float32
    np.testing.assert_allclose(ours * field(log, "truth_ratio"), 1.0, rtol=0, atol=2e-6)


def test_forget_quality_matches_tofu():
    full = tofu_log("phi-1.5_full", "eval_log_forget.json")
    retain = tofu_log("phi-1.5_retain90", "eval_log_forget.json")
    r_full = tofu.truth_ratio(*_forget_nlls("phi-1.5_full"))
    r_retain = tofu.truth_ratio(*_forget_nlls("phi-1.5_retain90"))
    fq = tofu.forget_quality(r_full, r_retain)
    expected = ks_2samp(tofu_truth_ratios(full), tofu_truth_ratios(retain)).pvalue
    assert fq == pytest.approx(expected, rel=1e-9, abs=0)
    # the model trained on the forget set is far from the retain model ...
    assert fq < 1e-10
    # ... and the retain model is indistinguishable from itself
    assert tofu.forget_quality(r_retain, r_retain) == 1.0


def _forget_nlls(model):
    data = tofu.split_data_from_tofu_log(tofu_log(model, "eval_log_forget.json"))
    return data["paraphrased_nll"], data["perturbed_nll"]


@pytest.mark.parametrize("model", MODELS)
def test_model_utility_matches_tofu(model):
    expected = tofu_utility_numbers(model)
    scores = tofu.utility_scores(our_splits(model))
    # nine numbers: {prob, rouge, truth_ratio} x {retain, real_authors, world_facts}; forget ignored
    assert set(scores) == {f"{s}_{m}" for s in tofu.UTILITY_SPLITS for m in tofu.UTILITY_METRICS}
    for key, value in scores.items():
        assert value == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    tofu_mu = hmean([v for k, v in expected.items() if not k.startswith("forget")])
    assert tofu.model_utility(scores) == pytest.approx(tofu_mu, rel=1e-9)
    assert 0.4 < tofu.model_utility(scores) < 0.6  # phi-1.5 on TOFU: MU about 0.5


def test_forget_split_scores_match_tofu_and_separate_the_models():
    full = tofu.split_scores("forget", our_splits("phi-1.5_full")["forget"])
    retain = tofu.split_scores("forget", our_splits("phi-1.5_retain90")["forget"])
    for model, ours in (("phi-1.5_full", full), ("phi-1.5_retain90", retain)):
        expected = tofu_utility_numbers(model)
        for metric in tofu.UTILITY_METRICS:
            assert ours[metric] == pytest.approx(expected[f"forget_{metric}"], rel=1e-9)
    # the full model has memorised the forget authors, the retain model has not
    assert full["prob"] > 0.8 > 0.2 > retain["prob"]
    assert full["rouge"] > retain["rouge"] + 0.3


def test_truth_ratio_hand_made():
    ratios = tofu.truth_ratio([1.0, 2.0], [[2.0, 2.0, 2.0], [1.0, 3.0, 0.5]])
    np.testing.assert_allclose(ratios, [math.e, math.exp(1.5 - 2.0)], rtol=1e-12)
    # ragged rows are fine (one mean per question)
    np.testing.assert_allclose(tofu.truth_ratio([0.0, 0.0], [[1.0], [1.0, 3.0]]), [math.e, math.e**2])
    # arithmetic variant (TOFU paper equation): mean of the probabilities, not of the NLLs
    arithmetic = tofu.truth_ratio([1.0], [[1.0, 3.0]], perturbed_mean="arithmetic")
    assert arithmetic[0] == pytest.approx(math.exp(-1.0) / ((math.exp(-1.0) + math.exp(-3.0)) / 2))
    assert arithmetic[0] < tofu.truth_ratio([1.0], [[1.0, 3.0]])[0]  # AM >= GM


def test_truth_ratio_validation():
    with pytest.raises(ValueError, match="2 rows but there are 1"):
        tofu.truth_ratio([1.0], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="empty"):
        tofu.truth_ratio([], [])
    with pytest.raises(ValueError, match="no perturbed answers"):
        tofu.truth_ratio([1.0], [[]])
    with pytest.raises(ValueError, match="perturbed_mean"):
        tofu.truth_ratio([1.0], [[1.0]], perturbed_mean="harmonic")


def test_truth_ratio_score_hand_made():
    ratios = [2.0, 0.5, 1.0]
    assert tofu.truth_ratio_score(ratios, "forget") == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert tofu.truth_ratio_score(ratios, "retain") == pytest.approx((0.5 + 0.0 + 0.0) / 3)
    assert tofu.truth_ratio_score(ratios, "world_facts") == tofu.truth_ratio_score(ratios, "retain")
    with pytest.raises(ValueError, match="unknown split"):
        tofu.truth_ratio_score(ratios, "test")
    with pytest.raises(ValueError, match="> 0"):
        tofu.truth_ratio_score([0.0], "forget")


def test_probability_score_hand_made():
    assert tofu.probability_score([0.0, math.log(2)]) == pytest.approx(0.75)
    # normalised: p_true = 1/2, wrong = 1/2 and 1/4 -> 0.5 / 1.25
    assert tofu.probability_score([math.log(2)], [[math.log(2), math.log(4)]]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="2 rows but there are 1"):
        tofu.probability_score([1.0], [[1.0], [1.0]])


def test_forget_quality_validation_and_direction():
    rng = np.random.default_rng(0)
    same = rng.lognormal(size=200)
    assert tofu.forget_quality(same, same) == 1.0
    assert tofu.forget_quality(rng.lognormal(size=200), rng.lognormal(3.0, size=200)) < 1e-6
    with pytest.raises(ValueError, match="empty"):
        tofu.forget_quality([], [1.0])


def test_model_utility_is_the_harmonic_mean():
    assert tofu.model_utility({"retain_prob": 1.0, "retain_rouge": 0.5}) == pytest.approx(2 / 3)
    values = np.random.default_rng(1).uniform(0.05, 1.0, size=9)
    scores = {f"m{i}": v for i, v in enumerate(values)}
    assert tofu.model_utility(scores) == pytest.approx(hmean(values), rel=1e-12)
    # one zero makes it zero
    assert tofu.model_utility({**scores, "world_facts_rouge": 0.0}) == 0.0


def test_model_utility_validation():
    with pytest.raises(ValueError, match="no scores"):
        tofu.model_utility({})
    with pytest.raises(ValueError, match="excludes the forget set"):
        tofu.model_utility({"retain_prob": 0.5, "forget_prob": 0.9})
    with pytest.raises(ValueError, match="non-negative"):
        tofu.model_utility({"retain_prob": -0.1})


def test_utility_scores_from_per_split_data():
    data = {"answer_nll": [math.log(2)], "rouge_l": [0.5], "perturbed_nll": [[math.log(2), math.log(4)]]}
    # real-world set without a paraphrase: the true answer plays its part (TOFU)
    scores = tofu.utility_scores({"real_authors": data, "forget": {}})
    assert scores == pytest.approx(
        {"real_authors_prob": 0.4, "real_authors_rouge": 0.5, "real_authors_truth_ratio": 1 - 1 / math.sqrt(2)}
    )
    with pytest.raises(ValueError, match="paraphrased_nll"):
        tofu.utility_scores({"retain": data})
    with pytest.raises(ValueError, match="no utility split"):
        tofu.utility_scores({"forget": data})
