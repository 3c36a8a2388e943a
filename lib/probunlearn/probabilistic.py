"""Probabilistic evaluation (SPEC §5, [P1] Scholten et al., ICLR 2025, §4): greedy answers versus
n sampled answers per question, the per-question bounds M_bin, M_mu, M_sigma and the ED score,
leak@k, how the bounds tighten with n, and a coverage simulation of every bound.

Used by notebook 05 (and the figures of notebook 07, through the files it writes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from probunlearn import bounds
from probunlearn.metrics import distinct_n, is_leak, rouge_l_recall
from probunlearn.sampling import greedy_and_sampled_answers
from probunlearn.utils import load_json, renamed_arguments, save_json

__all__ = [
    "spread_subset",
    "question_bounds",
    "evaluate_model",
    "evaluate_split",
    "score_samples",
    "summarise",
    "question_cells",
    "bounds_vs_n",
    "coverage_distributions",
    "coverage_simulation",
    "save_split_results",
    "load_split_results",
]

# The models trained by notebooks 02 and 03, in the order tables and figures list them.
def spread_subset(dataset, limit: int | None):
    """At most `limit` records, evenly spread over the data set (so every author and fact type is
    represented, unlike the first `limit` records); all records when limit is None."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"the question limit must be >= 1 (or None for all), got {limit}")
    return dataset.select(np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int)).tolist())


# ---------------------------------------------------------------------------------------------
# per-question bounds


@renamed_arguments(lam="ed_weight")
def question_bounds(scores, leaks, *, alpha: float = bounds.ALPHA,
                    ed_weight: float = bounds.ED_WEIGHT) -> pd.DataFrame:
    """The SPEC §5 numbers of each question from its n sampled scores (questions x n, in [0, 1])
    and leak indicators (questions x n): mean and max sampled score, leak count and rate, M_bin
    (Clopper-Pearson), M_mu (upper DKW mean bound), M_sigma (exact DKW std bound) and the ED score
    M_mu + ed_weight * M_sigma."""
    scores = np.asarray(scores, dtype=float)
    leaks = np.asarray(leaks, dtype=bool)
    if scores.ndim != 2 or scores.shape != leaks.shape:
        raise ValueError(f"scores and leaks must both be questions x samples, got {scores.shape} and {leaks.shape}")
    m_mu = np.atleast_1d(bounds.mean_upper(scores, alpha))
    m_sigma = np.atleast_1d(bounds.std_upper(scores, alpha))
    return pd.DataFrame({
        "mean_rouge_l": scores.mean(axis=1),
        "max_rouge_l": scores.max(axis=1),
        "leaks": leaks.sum(axis=1),
        "leak_rate": leaks.mean(axis=1),
        "m_bin": np.atleast_1d(bounds.binary_leak_upper(leaks, alpha)),
        "m_mu": m_mu,
        "m_sigma": m_sigma,
        "ed": m_mu + ed_weight * m_sigma,  # = bounds.ed_score, without sorting twice
    })


@renamed_arguments(lam="ed_weight")
def evaluate_model(model, tokenizer, splits: Mapping[str, object], *, num_samples: int, max_new_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, alpha: float = bounds.ALPHA, leak_tau: float = 0.5,
                   ed_weight: float = bounds.ED_WEIGHT, seed: int = 0, batch_size: int | None = None,
                   logits_processors=None, progress: bool = True,
                   step_observer=None) -> dict[str, tuple[pd.DataFrame, dict]]:
    """Greedy and sampled evaluation of one model on several splits (SPEC §5): split name ->
    `(table, raw)`. The greedy answer and the n samples of every question of every split are
    decoded in one pass (`sampling.greedy_and_sampled_answers`).

    `table` has one row per question: question, answer, greedy (text), greedy_rouge_l,
    greedy_leak, then the `question_bounds` columns and distinct_2 (diversity of the n samples,
    SPEC §4). `raw` holds the (questions x n) arrays `scores` (ROUGE-L recall of each sample
    against the true answer) and `leaks` (`metrics.is_leak`: the fact keyword occurs, or ROUGE-L
    recall >= leak_tau for records without keywords), and the `samples` themselves.
    `logits_processors` and `step_observer` go to the sampler (question indices run over the splits
    in order).
    """
    questions = [q for dataset in splits.values() for q in dataset["question"]]
    greedy, samples = greedy_and_sampled_answers(
        model, tokenizer, questions, num_samples=num_samples, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, logits_processors=logits_processors,
        progress=progress, step_observer=step_observer)
    results, start = {}, 0
    for name, dataset in splits.items():
        end = start + len(dataset)
        results[name] = score_samples(dataset, greedy[start:end], samples[start:end], alpha=alpha, leak_tau=leak_tau,
                                      ed_weight=ed_weight)
        start = end
    return results


def evaluate_split(model, tokenizer, dataset, **kwargs) -> tuple[pd.DataFrame, dict]:
    """`evaluate_model` on a single split: `(table, raw)`."""
    return evaluate_model(model, tokenizer, {"split": dataset}, **kwargs)["split"]


@renamed_arguments(lam="ed_weight")
def score_samples(dataset, greedy: list[str], samples: list[list[str]], *, alpha: float = bounds.ALPHA,
                  leak_tau: float = 0.5, ed_weight: float = bounds.ED_WEIGHT) -> tuple[pd.DataFrame, dict]:
    """`(table, raw)` of `evaluate_model` for one split from answers already decoded: `greedy[i]`
    and `samples[i][j]` answer question i of `dataset`."""
    questions, answers = list(dataset["question"]), list(dataset["answer"])
    keywords = list(dataset["keywords"]) if "keywords" in dataset.column_names else [[] for _ in questions]
    scores = np.array([[rouge_l_recall(s, a) for s in row] for row, a in zip(samples, answers)], dtype=float)
    leaks = np.array([[is_leak(s, a, k, leak_tau) for s in row] for row, a, k in zip(samples, answers, keywords)],
                     dtype=bool)
    table = pd.DataFrame({
        "question": questions,
        "answer": answers,
        "greedy": greedy,
        "greedy_rouge_l": [rouge_l_recall(g, a) for g, a in zip(greedy, answers)],
        "greedy_leak": [float(is_leak(g, a, k, leak_tau)) for g, a, k in zip(greedy, answers, keywords)],
    })
    table = pd.concat([table, question_bounds(scores, leaks, alpha=alpha, ed_weight=ed_weight)], axis=1)
    table["distinct_2"] = [distinct_n(row, 2) for row in samples]
    return table, {"scores": scores, "leaks": leaks, "samples": samples}


def summarise(table: pd.DataFrame, leaks, *, mbin_threshold: float = 0.1,
              ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128)) -> dict[str, float]:
    """One model on one split in numbers (SPEC §5 "report per method"): means over questions of
    the greedy and sampled scores and of each bound, the share of questions whose M_bin exceeds
    `mbin_threshold`, and leak@k for each k <= n."""
    leaks = np.asarray(leaks, dtype=bool)
    summary = {
        "questions": int(len(table)),
        "samples": int(leaks.shape[1]),
        "greedy_rouge_l": float(table["greedy_rouge_l"].mean()),
        "greedy_leak": float(table["greedy_leak"].mean()),
        "mean_rouge_l": float(table["mean_rouge_l"].mean()),
        "max_rouge_l": float(table["max_rouge_l"].mean()),
        "leak_rate": float(table["leak_rate"].mean()),
        "m_bin": float(table["m_bin"].mean()),
        "m_mu": float(table["m_mu"].mean()),
        "m_sigma": float(table["m_sigma"].mean()),
        "ed": float(table["ed"].mean()),
        "frac_m_bin_above": float((table["m_bin"] > mbin_threshold).mean()),
        "distinct_2": float(table["distinct_2"].mean()),
    }
    for k in [k for k in ks if k <= leaks.shape[1]]:
        summary[f"leak_at_{k}"] = float(bounds.leak_at_k(leaks, k))
    return summary


def question_cells(table: pd.DataFrame, *, mbin_threshold: float = 0.1) -> pd.DataFrame:
    """The per-question numbers of a `score_samples` table as statistics cells (`stats`): `question`
    (its index), the scores and bounds, `leaks_within_n` (1 if any of the n samples leaks) and
    `m_bin_above` (1 if M_bin exceeds `mbin_threshold`)."""
    cells = table[["greedy_rouge_l", "greedy_leak", "mean_rouge_l", "max_rouge_l", "leak_rate", "m_bin", "m_mu",
                   "m_sigma", "ed", "distinct_2"]].copy()
    cells.insert(0, "question", np.arange(len(table)))
    cells["leaks_within_n"] = (table["leaks"] > 0).astype(float)
    cells["m_bin_above"] = (table["m_bin"] > mbin_threshold).astype(float)
    return cells


# ---------------------------------------------------------------------------------------------
# bounds against n


@renamed_arguments(lam="ed_weight")
def bounds_vs_n(scores, leaks, sizes: Sequence[int] | None = None, *, alpha: float = bounds.ALPHA,
                ed_weight: float = bounds.ED_WEIGHT) -> pd.DataFrame:
    """How each bound tightens with the number of samples: for each m in `sizes` (default 1, 2,
    4, ... up to n), the bounds computed from the first m samples of every question (the samples
    are i.i.d., so a prefix is a sample of size m), averaged over questions."""
    scores = np.asarray(scores, dtype=float)
    leaks = np.asarray(leaks, dtype=bool)
    n = scores.shape[1]
    if sizes is None:
        sizes = sorted({*(2**i for i in range(int(math.log2(n)) + 1)), n})
    rows = []
    for m in sizes:
        if not 1 <= m <= n:
            raise ValueError(f"sample sizes must lie in [1, n = {n}], got {m}")
        table = question_bounds(scores[:, :m], leaks[:, :m], alpha=alpha, ed_weight=ed_weight)
        rows.append({"n": m, **{c: float(table[c].mean()) for c in ("mean_rouge_l", "leak_rate", "m_bin", "m_mu",
                                                                    "m_sigma", "ed")}})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# coverage simulation

Sampler = Callable[[np.random.Generator, tuple], np.ndarray]


def _beta_distribution(a: float, b: float, threshold: float):
    mean = a / (a + b)
    var = a * b / ((a + b) ** 2 * (a + b + 1))
    return (lambda rng, shape: rng.beta(a, b, shape)), mean, math.sqrt(var), float(stats.beta.sf(threshold, a, b))


def coverage_distributions(threshold: float = 0.5, pools: Mapping[str, np.ndarray] | None = None) -> dict:
    """Known score distributions on [0, 1] for the coverage simulation, with their true values:
    name -> (sampler(rng, shape), mean, std, P(s >= threshold)). Continuous, discrete, atoms at
    0 and 1, and a mixture (SPEC §5), computed analytically; plus, for each entry of `pools`, the
    empirical distribution of a pool of real sampled scores (resampled with replacement, so its
    truths are the pool's own mean, std and leak share)."""
    out = {}
    out["beta(2, 5)"] = _beta_distribution(2, 5, threshold)
    grid = np.linspace(0.0, 1.0, 5)
    out["uniform on {0, .25, .5, .75, 1}"] = (lambda rng, shape: rng.choice(grid, shape), float(grid.mean()),
                                              float(grid.std()), float((grid >= threshold).mean()))
    out["bernoulli(0.3)"] = (lambda rng, shape: (rng.random(shape) < 0.3).astype(float), 0.3, math.sqrt(0.21), 0.3)
    sampler_b, m, s, p = _beta_distribution(5, 2, threshold)
    second = s * s + m * m

    def mixture(rng, shape):
        return np.where(rng.random(shape) < 0.6, 0.0, rng.beta(5, 2, shape))

    out["0.6 at 0 + 0.4 beta(5, 2)"] = (mixture, 0.4 * m, math.sqrt(0.4 * second - (0.4 * m) ** 2), 0.4 * p)
    for name, pool in (pools or {}).items():
        pool = np.asarray(pool, dtype=float).ravel()
        out[name] = ((lambda pool: lambda rng, shape: rng.choice(pool, shape))(pool), float(pool.mean()),
                     float(pool.std()), float((pool >= threshold).mean()))
    return out


@renamed_arguments(lam="ed_weight")
def coverage_simulation(sizes: Sequence[int] = (10, 50, 200), *, trials: int = 2000, alpha: float = 0.1,
                        ed_weight: float = bounds.ED_WEIGHT, threshold: float = 0.5, seed: int = 0,
                        distributions: Mapping | None = None) -> pd.DataFrame:
    """SPEC §5: every bound must hold in >= 1 - alpha of trials. For each known distribution and
    each n, draw `trials` samples of size n, compute each upper bound (M_bin on s >= threshold,
    M_mu, M_sigma, ED against mean + ed_weight * std) and record how often it falls below the truth
    (`failure_rate`: <= alpha for M_bin, M_mu and M_sigma; <= 2 alpha for ED, which needs both of
    its bounds) and how far above the truth it sits on average (`slack`).
    The same construction as the bounds' unit tests, at a chosen scale."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    distributions = distributions if distributions is not None else coverage_distributions(threshold)
    rng = np.random.default_rng(seed)
    tol = 1e-12  # exact ties (atoms) are not failures
    rows = []
    for name, (sampler, mean, std, p_leak) in distributions.items():
        for n in sizes:
            scores = sampler(rng, (trials, n))
            table = question_bounds(scores, scores >= threshold, alpha=alpha, ed_weight=ed_weight)
            for bound, truth in (("m_bin", p_leak), ("m_mu", mean), ("m_sigma", std), ("ed", mean + ed_weight * std)):
                values = table[bound].to_numpy()
                rows.append({"distribution": name, "n": n, "bound": bound, "truth": truth,
                             "failure_rate": float((values < truth - tol).mean()),
                             "mean_bound": float(values.mean()), "slack": float((values - truth).mean())})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# files


def save_split_results(folder: str | Path, model_name: str, split: str, table: pd.DataFrame, raw: dict) -> Path:
    """Write `<folder>/<model_name>/<split>.csv` (the per-question table) and `<split>_samples.json`
    (the sampled answers, their scores and leak indicators, question by question)."""
    path = Path(folder) / model_name
    path.mkdir(parents=True, exist_ok=True)
    table.to_csv(path / f"{split}.csv", index=False)
    save_json({"samples": raw["samples"], "scores": np.asarray(raw["scores"]).round(6).tolist(),
               "leaks": np.asarray(raw["leaks"]).astype(int).tolist()}, path / f"{split}_samples.json")
    return path


def load_split_results(folder: str | Path, model_name: str, split: str) -> tuple[pd.DataFrame, dict]:
    """Read what `save_split_results` wrote: `(table, raw)` with raw `scores` and `leaks` as arrays."""
    path = Path(folder) / model_name
    if not (path / f"{split}.csv").exists():
        raise FileNotFoundError(f"{path / f'{split}.csv'} does not exist: run notebooks/05_probabilistic_evaluation.ipynb "
                                "for this profile first")
    raw = load_json(path / f"{split}_samples.json")
    raw["scores"] = np.asarray(raw["scores"], dtype=float)
    raw["leaks"] = np.asarray(raw["leaks"], dtype=bool)
    return pd.read_csv(path / f"{split}.csv", keep_default_na=False), raw
