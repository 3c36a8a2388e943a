"""TOFU's aggregates (Maini et al. 2024, arXiv 2401.06121, code github.com/locuslab/tofu; SPEC §4):
the truth ratio, the Prob score, Forget Quality and Model Utility, and the per-split data of a real
TOFU eval log. Every formula was checked against the real TOFU eval logs in `shared/fixtures/tofu/`
(tests/test_tofu.py):

- Prob, truth ratio, Model Utility: `aggregate_eval_stat.py::get_model_utility`.
- Forget Quality: `aggregate_eval_stat.py::get_forget_quality`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy.special import logsumexp
from scipy.stats import ks_2samp

# Split names (SPEC §1); the last two are the real-world utility sets.
SPLITS = ("forget", "retain", "real_authors", "world_facts")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
REAL_WORLD_SPLITS = ("real_authors", "world_facts")
# The three per-split numbers that enter Model Utility, as `<split>_<metric>` keys.
UTILITY_METRICS = ("prob", "rouge", "truth_ratio")
# TOFU's eval-log file name of each split (`config/eval_everything.yaml`, `eval_task`).
TOFU_EVAL_FILES = {
    "retain": "eval_log.json",
    "forget": "eval_log_forget.json",
    "real_authors": "eval_real_author_wo_options.json",
    "world_facts": "eval_real_world_wo_options.json",
}


# ---------------------------------------------------------------------------------------------
# input checks


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty; pass at least one value")
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN; check the losses/scores that produced it")
    return array


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


# ---------------------------------------------------------------------------------------------
# truth ratio, Prob and Forget Quality


def _perturbed_matrix(perturbed_nll, num_questions: int) -> list[np.ndarray]:
    rows = [np.asarray(row, dtype=float).reshape(-1) for row in perturbed_nll]
    if len(rows) != num_questions:
        raise ValueError(
            f"perturbed_nll has {len(rows)} rows but there are {num_questions} questions; "
            "pass one row of perturbed-answer NLLs per question"
        )
    for i, row in enumerate(rows):
        if row.size == 0:
            raise ValueError(f"question {i} has no perturbed answers; TOFU needs at least one")
        if np.isnan(row).any():
            raise ValueError(f"perturbed_nll row {i} contains NaN")
    return rows


def truth_ratio(paraphrased_nll, perturbed_nll, *, perturbed_mean: str = "geometric") -> np.ndarray:
    """Truth ratio R per question (TOFU, Maini et al. 2024), as TOFU's aggregation computes it.

    R_i = exp(mean_j NLL_avg(perturbed_ij) - NLL_avg(paraphrased_i))
        = P(paraphrase)^(1/|a|) / geometric-mean_j P(perturbed_j)^(1/|a_j|),
    exactly `curr_stat_1` of `aggregate_eval_stat.py::get_model_utility` and the truth ratio of
    `get_forget_quality` (SPEC §4 wording). R > 1: the model prefers the correct answer.
    On the real-world sets TOFU passes the true answer as the "paraphrase".

    Note: the stored per-item `truth_ratio` field of TOFU's eval logs is 1/R, and the TOFU paper's
    equation (and the older `utils.py::get_model_utility`) averages the perturbed *probabilities*
    arithmetically; `perturbed_mean="arithmetic"` gives that variant, still oriented as R here:
    R_i = P(paraphrase)^(1/|a|) / mean_j P(perturbed_j)^(1/|a_j|).

    paraphrased_nll: (questions,); perturbed_nll: (questions, num_perturbed), rows may differ in
    length.
    """
    paraphrased = _as_1d(paraphrased_nll, "paraphrased_nll")
    rows = _perturbed_matrix(perturbed_nll, paraphrased.size)
    if perturbed_mean == "geometric":
        perturbed = np.array([row.mean() for row in rows])
    elif perturbed_mean == "arithmetic":
        # -log mean_j exp(-nll_j), computed stably
        perturbed = np.array([np.log(row.size) - logsumexp(-row) for row in rows])
    else:
        raise ValueError(f"perturbed_mean must be 'geometric' or 'arithmetic', got {perturbed_mean!r}")
    return np.exp(perturbed - paraphrased)


def truth_ratio_score(truth_ratios, split: str = "forget") -> float:
    """TOFU's truth-ratio score of a split (`aggregate_eval_stat.py::get_model_utility`).

    forget: mean min(R, 1/R) (1 = indifferent between true and false answers, as a model that
    never saw the data); retain / real_authors / world_facts: mean max(0, 1 - 1/R).
    """
    ratios = _as_1d(truth_ratios, "truth_ratios")
    if (ratios <= 0).any():
        raise ValueError("truth ratios are exp(...) > 0; got a value <= 0")
    if _check_split(split) == "forget":
        return float(np.mean(np.minimum(ratios, 1.0 / ratios)))
    return float(np.mean(np.maximum(0.0, 1.0 - 1.0 / ratios)))


def probability_score(answer_nll, perturbed_nll=None) -> float:
    """TOFU's Prob (`aggregate_eval_stat.py::get_model_utility`).

    Without `perturbed_nll` (forget / retain): mean_i exp(-NLL_avg(a_i)).
    With it (real-world sets): mean_i p_i / (p_i + sum_j p_ij), with the length-normalised
    probabilities p = exp(-NLL_avg) of the true answer and of each wrong answer.
    """
    true_nll = _as_1d(answer_nll, "answer_nll")
    if perturbed_nll is None:
        return float(np.mean(np.exp(-true_nll)))
    rows = _perturbed_matrix(perturbed_nll, true_nll.size)
    normalised = [
        np.exp(-nll - logsumexp(np.concatenate([[-nll], -row]))) for nll, row in zip(true_nll, rows)
    ]
    return float(np.mean(normalised))


def forget_quality(unlearned_truth_ratios, retain_truth_ratios) -> float:
    """Forget Quality (TOFU, `aggregate_eval_stat.py::get_forget_quality`).

    p-value of the two-sample Kolmogorov–Smirnov test (`scipy.stats.ks_2samp`, default two-sided)
    between the forget-set truth ratios of the unlearned model and of the retain-only model.
    High (-> 1) means indistinguishable from never having trained on the forget set.
    """
    unlearned = _as_1d(unlearned_truth_ratios, "unlearned_truth_ratios")
    retain = _as_1d(retain_truth_ratios, "retain_truth_ratios")
    return float(ks_2samp(unlearned, retain).pvalue)


# ---------------------------------------------------------------------------------------------
# Model Utility


def harmonic_mean(values) -> float:
    """Harmonic mean of non-negative numbers; 0.0 as soon as one of them is 0."""
    array = _as_1d(values, "values")
    if (array < 0).any():
        raise ValueError(f"the harmonic mean needs non-negative values, got {array[array < 0][0]}")
    if (array == 0).any():
        return 0.0
    return float(array.size / np.sum(1.0 / array))


def split_scores(split: str, data: Mapping) -> dict[str, float]:
    """Prob, ROUGE and truth-ratio score of one split, as TOFU's `get_model_utility` makes them.

    `data` holds per-question arrays: `answer_nll` (NLL_avg of the true answer), `rouge_l`
    (ROUGE-L recall of the greedy answer), `perturbed_nll` (questions x wrong answers) and
    `paraphrased_nll` (forget / retain; on the real-world sets it defaults to `answer_nll`,
    as TOFU uses the true answer in place of the paraphrase). Returns {"prob", "rouge", "truth_ratio"}.
    """
    _check_split(split)
    missing = [k for k in ("answer_nll", "rouge_l", "perturbed_nll") if k not in data]
    if split not in REAL_WORLD_SPLITS and "paraphrased_nll" not in data:
        missing.append("paraphrased_nll")
    if missing:
        raise ValueError(f"split {split!r} is missing {', '.join(missing)}")
    real_world = split in REAL_WORLD_SPLITS
    paraphrased = data.get("paraphrased_nll")
    if paraphrased is None:
        paraphrased = data["answer_nll"]
    rouge = _as_1d(data["rouge_l"], "rouge_l")
    return {
        "prob": probability_score(data["answer_nll"], data["perturbed_nll"] if real_world else None),
        "rouge": float(rouge.mean()),
        "truth_ratio": truth_ratio_score(truth_ratio(paraphrased, data["perturbed_nll"]), split),
    }


def utility_scores(splits: Mapping[str, Mapping]) -> dict[str, float]:
    """The (up to) nine Model-Utility numbers, `<split>_<metric>` for the utility splits present.

    `splits` maps split names to the per-question data of `split_scores`; splits other than
    retain / real_authors / world_facts (i.e. forget) are ignored, as in TOFU.
    """
    present = [s for s in UTILITY_SPLITS if s in splits]
    if not present:
        raise ValueError(f"no utility split given; pass at least one of {', '.join(UTILITY_SPLITS)}")
    scores = {}
    for split in present:
        for metric, value in split_scores(split, splits[split]).items():
            scores[f"{split}_{metric}"] = value
    return scores


def model_utility(scores: Mapping[str, float]) -> float:
    """Model Utility (TOFU, `aggregate_eval_stat.py::get_model_utility`): harmonic mean of the values.

    `scores` are the {Prob, ROUGE-L, truth-ratio score} x {retain, real authors, world facts}
    numbers (whichever exist), e.g. from `utility_scores`. A zero makes it zero.
    Forget-set numbers are refused: TOFU leaves them out of Model Utility.
    """
    if not scores:
        raise ValueError("model_utility got no scores")
    forget_keys = [k for k in scores if str(k).lower().startswith("forget")]
    if forget_keys:
        raise ValueError(f"Model Utility excludes the forget set; drop {', '.join(forget_keys)}")
    return harmonic_mean(list(scores.values()))


def split_data_from_tofu_log(log: Mapping) -> dict[str, np.ndarray | list]:
    """Per-question data (the `split_scores` format) from one TOFU eval-log JSON (as loaded).

    Maps `avg_gt_loss` -> answer_nll, `rougeL_recall` -> rouge_l, `avg_paraphrased_loss` ->
    paraphrased_nll, `average_perturb_loss` -> perturbed_nll, in question-index order.
    """
    fields = {
        "answer_nll": "avg_gt_loss",
        "rouge_l": "rougeL_recall",
        "paraphrased_nll": "avg_paraphrased_loss",
        "perturbed_nll": "average_perturb_loss",
    }
    missing = [f for f in fields.values() if f not in log]
    if missing:
        raise ValueError(f"not a TOFU eval log: missing {', '.join(missing)}")
    data = {}
    for name, field in fields.items():
        by_index = log[field]
        values = [by_index[k] for k in sorted(by_index, key=int)]
        data[name] = values if name == "perturbed_nll" else np.asarray(values, dtype=float)
    return data
