"""Intervals and paired verdicts for claims made over several seeds (SPEC §6: a verdict rests on
several seeds and a paired test, never on one run's difference).

The unit of the statistics is a (seed, question) cell: one number per question of the evaluation
set for each unlearning seed (the target stays fixed). Means get a 95 % bootstrap interval over
those cells (`mean_interval`); two variants of a method are compared on the same cells
(`paired_verdict`): the 95 % bootstrap interval of the mean paired difference decides "lower",
"not lower" or "inconclusive", and the Wilcoxon signed-rank test gives a p-value beside it. Both
come from SciPy (`scipy.stats.bootstrap`, `scipy.stats.wilcoxon`).

Caveat, stated wherever these numbers are shown: cells of one seed share a model, so they are not
independent draws; with 3 seeds the interval describes the spread over questions and seeds, not a
population of training runs. Used by notebooks 03, 04 and 05.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["mean_interval", "paired_verdict", "summarise_cells", "chi_square_p", "VERDICTS", "CONFIDENCE"]

CONFIDENCE = 0.95
VERDICTS = ("lower", "not lower", "inconclusive")
_RESAMPLES = 4000


def _bootstrap_interval(values: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    if np.ptp(values) == 0:  # every cell equal: the interval is that value (the bootstrap is degenerate)
        return float(values[0]), float(values[0])
    with warnings.catch_warnings():  # BCa's failure on very skewed cells is handled below: no warning for it
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", getattr(stats, "DegenerateDataWarning", RuntimeWarning))
        result = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=_RESAMPLES,
                                 method="BCa", random_state=np.random.default_rng(seed))
    low, high = result.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa can fail on very skewed cells: percentile instead
        result = stats.bootstrap((values,), np.mean, confidence_level=confidence, n_resamples=_RESAMPLES,
                                 method="percentile", random_state=np.random.default_rng(seed))
        low, high = result.confidence_interval
    return float(low), float(high)


def _cells(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty: pass one value per (seed, question)")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return array


def mean_interval(values, *, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """{'mean', 'low', 'high', 'cells'}: the mean of `values` (one per (seed, question) cell, any
    shape) and its bootstrap (BCa) interval at `confidence`."""
    cells = _cells(values, "values")
    low, high = _bootstrap_interval(cells, confidence, seed) if cells.size > 1 else (float(cells[0]),) * 2
    return {"mean": float(cells.mean()), "low": low, "high": high, "cells": int(cells.size)}


def paired_verdict(baseline, variant, *, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Is `variant` lower than `baseline` on the same (seed, question) cells (arrays of one shape)?

    Returns {'mean_difference' (variant - baseline), 'low', 'high' (its bootstrap interval),
    'p_value' (two-sided Wilcoxon signed-rank; 1.0 when every difference is zero), 'cells',
    'verdict'}: "lower" when the whole interval is below zero, "not lower" when it lies at or above
    zero, "inconclusive" when it contains values of both signs."""
    baseline, variant = np.asarray(baseline, dtype=float), np.asarray(variant, dtype=float)
    if baseline.shape != variant.shape:
        raise ValueError(f"paired cells must have one shape, got {baseline.shape} and {variant.shape}")
    difference = _cells(variant, "variant") - _cells(baseline, "baseline")
    interval = mean_interval(difference, confidence=confidence, seed=seed)
    p_value = 1.0 if not difference.any() else float(stats.wilcoxon(difference).pvalue)
    if interval["high"] < 0:
        verdict = "lower"
    elif interval["low"] >= 0:
        verdict = "not lower"
    else:
        verdict = "inconclusive"
    return {"mean_difference": interval["mean"], "low": interval["low"], "high": interval["high"],
            "p_value": p_value, "cells": interval["cells"], "verdict": verdict}


def paired_verdicts(cells, *, compare: str, reference, metrics: Sequence[str], within: Sequence[str] = (),
                    on: Sequence[str] = ("seed", "question"), reference_role: str = "baseline",
                    sort_cells: bool = False):
    """`paired_verdict` for many pairs of a long table of cells, one row each: within each group of
    the `within` columns (in the order they first appear), every value of the column `compare` other
    than `reference` against `reference`, on the same cells (`on`), for each of `metrics`.

    `reference_role`: "baseline" (the default) tests whether the other value is lower than the
    reference; "variant" whether the reference is lower than the other value. `sort_cells`: pair the
    cells in the order of `on` (else in the order the reference's cells appear; the order changes only
    the bootstrap's draws). Columns: the `within` columns, `compare`, `metric`, `seeds` (distinct
    seeds of the other value's cells) and `paired_verdict`'s keys."""
    import pandas as pd

    if reference_role not in ("baseline", "variant"):
        raise ValueError(f"reference_role must be 'baseline' or 'variant', got {reference_role!r}")
    rows = []
    for key, group in (cells.groupby(list(within), sort=False) if within else [((), cells)]):
        key = key if isinstance(key, tuple) else (key,)
        base = group[group[compare] == reference].set_index(list(on))
        base = base.sort_index() if sort_cells else base
        for value, part in group.groupby(compare, sort=False):
            if value == reference:
                continue
            other = part.set_index(list(on))
            for metric in metrics:
                pair = (base[metric].to_numpy(), other[metric].reindex(base.index).to_numpy())
                verdict = paired_verdict(*(pair if reference_role == "baseline" else pair[::-1]))
                rows.append({**dict(zip(within, key)), compare: value, "metric": metric,
                             "seeds": int(part["seed"].nunique()), **verdict})
    return pd.DataFrame(rows)


def summarise_cells(cells, by: Sequence[str], metrics: Sequence[str], *, confidence: float = CONFIDENCE):
    """Per group of `cells` (a long table, one row per (seed, question) and whatever `by` names),
    for each metric: `<metric>` (the mean over the group's cells), `<metric>_low`, `<metric>_high`
    (its `mean_interval`), plus `seeds` (distinct seeds in the group) and `cells`. A DataFrame, one
    row per group, in the order the groups first appear."""
    import pandas as pd

    rows = []
    for key, group in cells.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        for metric in metrics:
            interval = mean_interval(group[metric].to_numpy(), confidence=confidence)
            row |= {metric: interval["mean"], f"{metric}_low": interval["low"], f"{metric}_high": interval["high"]}
        row |= {"seeds": int(group["seed"].nunique()), "cells": int(len(group))}
        rows.append(row)
    return pd.DataFrame(rows)


def chi_square_p(counts, probs) -> float:
    """p-value of a chi-square goodness of fit of observed `counts` per category (e.g. sampled first
    tokens) to the exact probabilities `probs`; categories expected fewer than 5 times are pooled into
    one. A category of probability 0 that was observed is an error, not a small p-value. The
    exactness check of a sampler (tests/test_sampling.py, benchmarks/gpu_check.py)."""
    counts, probs = np.asarray(counts, float), np.asarray(probs, float)
    if counts[probs == 0].sum() != 0:
        raise ValueError("a category of probability 0 was observed (e.g. a token outside the nucleus was sampled)")
    expected = probs * counts.sum()
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return float(stats.chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum()).pvalue)
