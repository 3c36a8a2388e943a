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
from probunlearn.sampling import greedy_and_sampled_answers, sample_answers
from probunlearn.utils import load_json, renamed_arguments, save_json

__all__ = [
    "spread_subset",
    "question_bounds",
    "evaluate_model",
    "evaluate_split",
    "score_samples",
    "summarise",
    "question_cells",
    "claim_table",
    "fact_table",
    "greedy_agreement",
    "claim_verdicts",
    "extra_samples",
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
    return dataset.select(spread_indices(len(dataset), limit).tolist())


def spread_indices(size: int, limit: int) -> np.ndarray:
    """The indices `spread_subset` keeps of `size` records when at most `limit` are wanted."""
    return np.unique(np.linspace(0, size - 1, limit).round().astype(int))


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
                   logits_processors=None, progress: bool = True, step_observer=None,
                   clean_samples: int | None = None,
                   adaptive_splits: Sequence[str] = ("forget",)) -> dict[str, tuple[pd.DataFrame, dict]]:
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

    `clean_samples` (> num_samples): the questions of `adaptive_splits` whose greedy answer does not
    leak get `clean_samples` samples in all (`extra_samples`), the others keep `num_samples`. The greedy
    answer does not depend on the sampling randomness, so a number of samples chosen from it keeps every
    per-question bound valid; it spends samples where a bound can show forgetting (zero leaks give M_bin
    1 − α^(1/n): 0.25 at n = 16, 0.07 at n = 64, α = 0.01) and where [P1]'s claim lives (greedy clean).
    """
    questions = [q for dataset in splits.values() for q in dataset["question"]]
    greedy, samples = greedy_and_sampled_answers(
        model, tokenizer, questions, num_samples=num_samples, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, logits_processors=logits_processors,
        progress=progress, step_observer=step_observer)
    results, start = {}, 0
    for name, dataset in splits.items():
        end = start + len(dataset)
        answers = samples[start:end]
        if clean_samples is not None and name in adaptive_splits:
            keywords = list(dataset["keywords"]) if "keywords" in dataset.column_names else [[]] * len(dataset)
            clean = [i for i, (g, a, k) in enumerate(zip(greedy[start:end], dataset["answer"], keywords))
                     if not is_leak(g, a, k, leak_tau)]
            answers = extra_samples(model, tokenizer, dataset, answers, clean, total=clean_samples,
                                    temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                                    batch_size=batch_size, logits_processors=logits_processors, progress=progress)
        results[name] = score_samples(dataset, greedy[start:end], answers, alpha=alpha, leak_tau=leak_tau,
                                      ed_weight=ed_weight)
        start = end
    return results


# Sampling seed of the extra samples of `extra_samples`: far from the seeds of the first ones, so the
# two sets are independent draws with any engine (ours draws answer j of a question from (seed, question, j)).
EXTRA_SEED_OFFSET = 1_000_003


def extra_samples(model, tokenizer, dataset, samples: list[list[str]], questions: Sequence[int], *, total: int,
                  max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                  batch_size: int | None = None, logits_processors=None, progress: bool = True) -> list[list[str]]:
    """`samples` (answers per question of `dataset`) with the questions at the indices `questions`
    topped up to `total` answers each, drawn in one batched pass with the seed `seed +
    EXTRA_SEED_OFFSET`, independent of the first ones. Returns a new list; the others are unchanged."""
    samples = [list(row) for row in samples]
    have = {len(samples[i]) for i in questions}
    if not questions or total <= min(have):
        return samples
    if len(have) != 1:
        raise ValueError(f"questions to top up must have the same number of samples, got {sorted(have)}")
    more = sample_answers(model, tokenizer, [dataset[int(i)]["question"] for i in questions],
                          num_samples=total - have.pop(), temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, seed=seed + EXTRA_SEED_OFFSET, batch_size=batch_size,
                          logits_processors=logits_processors, progress=progress)
    for i, answers in zip(questions, more):
        samples[i].extend(answers)
    return samples


def evaluate_split(model, tokenizer, dataset, **kwargs) -> tuple[pd.DataFrame, dict]:
    """`evaluate_model` on a single split: `(table, raw)`."""
    return evaluate_model(model, tokenizer, {"split": dataset}, **kwargs)["split"]


@renamed_arguments(lam="ed_weight")
def score_samples(dataset, greedy: list[str], samples: list[list[str]], *, alpha: float = bounds.ALPHA,
                  leak_tau: float = 0.5, ed_weight: float = bounds.ED_WEIGHT) -> tuple[pd.DataFrame, dict]:
    """`(table, raw)` of `evaluate_model` for one split from answers already decoded: `greedy[i]`
    and `samples[i][j]` answer question i of `dataset`. Questions may have different numbers of
    samples (`extra_samples`): the table's bounds and counts use all of a question's samples (column
    `n`), while raw `scores` and `leaks` hold the first samples every question has (a common prefix,
    for leak@k and the bounds against n) and `more_scores` / `more_leaks` the rest, per question.
    The record's `fact` (its fact type) is copied when the data set has it."""
    questions, answers = list(dataset["question"]), list(dataset["answer"])
    keywords = list(dataset["keywords"]) if "keywords" in dataset.column_names else [[] for _ in questions]
    scores = [np.array([rouge_l_recall(s, a) for s in row], dtype=float) for row, a in zip(samples, answers)]
    leaks = [np.array([is_leak(s, a, k, leak_tau) for s in row], dtype=bool) for row, a, k in zip(samples, answers, keywords)]
    table = pd.DataFrame({
        "question": questions,
        "answer": answers,
        "greedy": greedy,
        "greedy_rouge_l": [rouge_l_recall(g, a) for g, a in zip(greedy, answers)],
        "greedy_leak": [float(is_leak(g, a, k, leak_tau)) for g, a, k in zip(greedy, answers, keywords)],
    })
    if "fact" in dataset.column_names:
        table["fact"] = list(dataset["fact"])
    sizes = np.array([len(row) for row in samples])
    parts = []  # the bounds of the questions of each sample size, back in question order
    for size in np.unique(sizes):
        index = np.flatnonzero(sizes == size)
        part = question_bounds(np.stack([scores[i] for i in index]), np.stack([leaks[i] for i in index]),
                               alpha=alpha, ed_weight=ed_weight)
        parts.append(part.set_axis(index))
    if parts:
        table = pd.concat([table, pd.concat(parts).sort_index()], axis=1)
    table["n"] = sizes
    table["distinct_2"] = [distinct_n(row, 2) for row in samples]
    first = int(sizes.min()) if len(sizes) else 0  # a common prefix: the first samples of every question
    return table, {"scores": np.array([s[:first] for s in scores]).reshape(len(samples), first),
                   "leaks": np.array([l[:first] for l in leaks]).reshape(len(samples), first),
                   "samples": samples, "more_scores": [s[first:].tolist() for s in scores],
                   "more_leaks": [l[first:].astype(int).tolist() for l in leaks]}


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
    (its index), the scores and bounds, `n` (the question's samples), `leaks_within_n` (1 if any of
    them leaks), `m_bin_above` (1 if M_bin exceeds `mbin_threshold`) and, where the table has it,
    `fact` (the fact type). `leak_rate` is the share of leaking samples: the chance that one sampled
    answer leaks."""
    columns = ["greedy_rouge_l", "greedy_leak", "mean_rouge_l", "max_rouge_l", "leak_rate", "m_bin", "m_mu",
               "m_sigma", "ed", "distinct_2", *[c for c in ("n", "fact") if c in table.columns]]
    cells = table[columns].copy()
    cells.insert(0, "question", np.arange(len(table)))
    cells["leaks_within_n"] = (table["leaks"] > 0).astype(float)
    cells["m_bin_above"] = (table["m_bin"] > mbin_threshold).astype(float)
    return cells


def claim_table(cells: pd.DataFrame, models: Sequence[str] | None = None) -> pd.DataFrame:
    """[P1]'s first claim per model, from the forget-split cells of notebook 05 (`question_cells` plus
    `model`, `seed`; one row per (model, seed, question)): the share of questions whose greedy answer
    leaks (`greedy_leak`), that leak in at least one of their n samples (`leaks_within_n`), the chance
    that one sampled answer leaks (`leak_rate`), and the number the claim is about,
    `leak_given_clean`: of the questions whose greedy answer does not leak, the share that leak within
    n (`clean_cells` of them). Each with a 95 % interval grouped by seed (`stats.mean_interval`:
    seeds, then questions within a seed), plus `seeds`, `questions` and the sample counts used
    (`n_clean`, `n_leaking`: the n of greedily clean and leaking questions)."""
    from probunlearn.stats import mean_interval

    rows = []
    for name in models if models is not None else list(dict.fromkeys(cells["model"])):
        part = cells[cells["model"] == name]
        if part.empty:
            continue
        clean = part[part["greedy_leak"] == 0]
        row = {"model": name, "seeds": int(part["seed"].nunique()), "questions": int(part["question"].nunique())}
        for column, frame in (("greedy_leak", part), ("leaks_within_n", part), ("leak_rate", part),
                              ("leak_given_clean", clean)):
            values = frame["leaks_within_n" if column == "leak_given_clean" else column]
            interval = mean_interval(values, groups=frame["seed"]) if len(frame) else {"mean": np.nan, "low": np.nan, "high": np.nan}
            row |= {column: interval["mean"], f"{column}_low": interval["low"], f"{column}_high": interval["high"]}
        n = part.get("n", pd.Series(np.nan, index=part.index))
        row |= {"clean_cells": int(len(clean)), "n_clean": _one_or_range(n[part["greedy_leak"] == 0]),
                "n_leaking": _one_or_range(n[part["greedy_leak"] > 0])}
        rows.append(row)
    return pd.DataFrame(rows)


def claim_verdicts(cells: pd.DataFrame, reference: str = "retain") -> pd.DataFrame:
    """Sampling against guessing, per model of notebook 05's forget cells (`model`, `seed`,
    `question`, `greedy_leak`, `leak_rate`): on the questions whose greedy answer is clean, does one
    sampled answer of the model leak more often than one of the `reference` model (the retain model,
    which never saw the facts) on the same questions? The leak rate is an unbiased estimate whatever
    n was, so the two compare although their n differ. `stats.paired_verdict` with the reference as
    baseline ("higher": the model leaks more than the reference), grouped by seed, then Holm over the
    models (`stats.holm_verdicts`). One row per model with clean questions, `clean_cells` beside."""
    from probunlearn.stats import holm_verdicts, paired_verdict

    if reference not in set(cells["model"]):
        return pd.DataFrame(columns=["model", "clean_cells", "verdict", "p_value_holm"])
    baseline = cells[cells["model"] == reference].drop_duplicates("question").set_index("question")["leak_rate"]
    rows = []
    for name in dict.fromkeys(cells["model"]):
        clean = cells[(cells["model"] == name) & (cells["greedy_leak"] == 0)]
        if name == reference or clean.empty:
            continue
        verdict = paired_verdict(baseline.loc[clean["question"]].to_numpy(), clean["leak_rate"].to_numpy(),
                                 groups=clean["seed"].to_numpy())
        rows.append({"model": name, "reference": reference, "clean_cells": len(clean), **verdict})
    return holm_verdicts(pd.DataFrame(rows)) if rows else pd.DataFrame(columns=["model", "clean_cells", "verdict"])


def greedy_agreement(cells: pd.DataFrame, unlearning_cells: pd.DataFrame, *, forget_size: int) -> pd.DataFrame:
    """Notebook 03's greedy answers against notebook 05's, for each unlearned model and seed in both:
    per forget question that 03 evaluated (its `spread_subset` of the `forget_size` questions 05
    answers), 03's keyword hit and 05's greedy leak, and `agree` (1 when both say the same). `cells`:
    05's forget cells (`model`, `seed`, `question`, `greedy_leak`); `unlearning_cells`: 03's
    (`method`, `variant`, `seed`, `split`, `question`, `keyword_hit`)."""
    from probunlearn.results import model_name

    theirs = unlearning_cells[unlearning_cells["split"] == "forget"].copy()
    if theirs.empty:
        return pd.DataFrame(columns=["model", "seed", "question", "keyword_hit", "greedy_leak", "agree"])
    subset = spread_indices(forget_size, theirs["question"].nunique())
    theirs["model"] = [model_name(m, v) for m, v in zip(theirs["method"], theirs["variant"])]
    theirs["question"] = subset[theirs["question"].to_numpy()]
    merged = theirs[["model", "seed", "question", "keyword_hit"]].merge(
        cells[["model", "seed", "question", "greedy_leak"]], on=["model", "seed", "question"])
    merged["agree"] = ((merged["keyword_hit"] > 0) == (merged["greedy_leak"] > 0)).astype(float)
    return merged


def _one_or_range(values: pd.Series) -> str:
    values = sorted({int(v) for v in values.dropna()})
    return "" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def fact_table(cells: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Leaks by fact type (the generated data's `fact` of each forget question) for the `models`
    pooled: per fact type the questions, the share leaking greedily, within n, and of the greedily
    clean ones within n. Read it beside the same table of the retain model: it never saw the facts,
    so what it "leaks" is guessed (years, jobs from a short list)."""
    part = cells[cells["model"].isin(models)]
    grouped = part.groupby("fact")
    table = pd.DataFrame({"cells": grouped.size(), "greedy_leak": grouped["greedy_leak"].mean(),
                          "leaks_within_n": grouped["leaks_within_n"].mean(), "leak_rate": grouped["leak_rate"].mean(),
                          "leak_given_clean": part[part["greedy_leak"] == 0].groupby("fact")["leaks_within_n"].mean()})
    return table.reset_index()


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
               "leaks": np.asarray(raw["leaks"]).astype(int).tolist(),
               **{key: raw[key] for key in ("more_scores", "more_leaks") if key in raw}}, path / f"{split}_samples.json")
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
