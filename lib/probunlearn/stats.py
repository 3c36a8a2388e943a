"""Intervals, paired tests and verdicts for claims made over several seeds (SPEC §6, "How a claim is
tested": a verdict rests on several seeds and a paired test, never on one run's difference).

The unit. A cell is one (seed, question): one number per question of the evaluation set for each
unlearning seed (the target stays fixed). Cells of one seed share one trained model, so they are
not independent draws: the seed is the unit of replication, the question is nested in it.

- `mean_interval(values, groups=...)`: the mean of the cells and its 95 % interval. With the seed of
  each cell as its group, a two-level percentile bootstrap: each replicate resamples seeds with
  replacement, then questions within each drawn seed with replacement, and takes the mean of all
  drawn cells, so the interval carries the seed-to-seed spread as well as the question-to-question
  one. Without groups (or with one seed), SciPy's BCa bootstrap over cells (`scipy.stats.bootstrap`).
- `sign_flip_p(differences)`: the two-sided p-value of a mean paired difference by a sign-flip
  permutation test (`scipy.stats.permutation_test`; exact when every flip can be enumerated). Zero
  differences are kept (unlike the Wilcoxon signed-rank test, which drops them). Flipping cells
  tests the question-level null given the trained models; the grouped interval carries the
  seed-level uncertainty; a verdict needs both.
- `paired_verdict(baseline, variant, groups=...)`: the difference variant − baseline on the same
  cells: "lower" when its grouped interval lies below zero, "higher" when above, "inconclusive"
  when it holds zero, and "no difference" when every cell's difference is exactly zero (the variant
  changed nothing: that is not a test and is not counted as one). A result that is not "lower"
  states the largest reduction its interval leaves possible (`excludes_lower_by`): the data exclude
  any larger one.
- `holm(p_values)`, `holm_verdicts(table)`: a notebook's verdicts are one family; their p-values are
  Holm-adjusted (step-down, family-wise error α = 0.05) and a "lower" or "higher" whose adjusted
  p-value is not below α becomes "inconclusive". `paired_verdicts` (a long table of cells) groups by
  its "seed" column and applies Holm to all the rows it returns.

What 3 seeds can and cannot show: a two-level bootstrap over G groups draws from only
C(2G − 1, G) distinct multisets of seeds (10 for G = 3), and the resampled spread of G seed means
underestimates their true spread by a factor (G − 1)/G in variance, so with 3 seeds the interval
is optimistic (too narrow) about the spread over training runs. A "lower" over 3 seeds says the
effect held on every seed and question resample of these runs, not that a fourth seed would show it;
a null result over 3 seeds rules out little beyond the effect its interval excludes. Used by
notebooks 03, 04, 05 and 06.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
from scipy import stats

__all__ = ["mean_interval", "sign_flip_p", "holm", "paired_verdict", "paired_verdicts", "holm_verdicts",
           "summarise_cells", "chi_square_p", "VERDICTS", "NOT_TESTED", "CONFIDENCE", "ALPHA"]

CONFIDENCE = 0.95  # level of every interval
ALPHA = 0.05  # family-wise error rate of a notebook's verdicts (Holm)
VERDICTS = ("lower", "higher", "inconclusive", "no difference")
# Rows of a verdict table that are not tests (no p-value enters Holm's family): the variant changed
# nothing, or (`comparison.verdict_table`) it changed no sample / the baseline sat at the bound's floor.
NOT_TESTED = ("no difference", "changed no sample", "cannot show a reduction at this n")
GROUPED_METHOD = "two-level bootstrap (groups, then cells within)"
CELL_METHOD = "BCa bootstrap over cells"
_RESAMPLES = 4000  # bootstrap replicates
_FLIPS = 20000  # sign-flip resamples (exact enumeration when 2**cells is at most this)


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


def _grouped_interval(values: np.ndarray, codes: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    """Two-level percentile bootstrap: per replicate, draw the groups with replacement, then, for each
    drawn slot afresh, that group's cells with replacement; the statistic is the mean of all drawn
    cells. Vectorised: every replicate's draws lie in one flat array."""
    if np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    order = np.argsort(codes, kind="stable")
    values, codes = values[order], codes[order]
    sizes = np.bincount(codes)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    num_groups = sizes.size
    slots = rng.integers(0, num_groups, size=(_RESAMPLES, num_groups)).ravel()  # drawn groups, replicate-major
    per_slot = sizes[slots]
    slot_group = np.repeat(slots, per_slot)  # one entry per drawn cell
    picks = starts[slot_group] + (rng.random(slot_group.size) * sizes[slot_group]).astype(np.int64)
    replicate = np.repeat(np.arange(_RESAMPLES), per_slot.reshape(_RESAMPLES, num_groups).sum(axis=1))
    means = np.bincount(replicate, weights=values[picks], minlength=_RESAMPLES) / np.bincount(replicate,
                                                                                               minlength=_RESAMPLES)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _cells(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty: pass one value per (seed, question)")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return array


def _group_codes(groups, size: int) -> np.ndarray:
    labels = np.asarray(groups).ravel()
    if labels.size != size:
        raise ValueError(f"groups has {labels.size} labels for {size} cells: pass one group label (e.g. the seed) "
                         "per cell, in the order of the values")
    return np.unique(labels, return_inverse=True)[1].ravel()


def mean_interval(values, *, groups=None, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """The mean of `values` (one per (seed, question) cell, any shape) and its interval at `confidence`.

    `groups`: one label per cell (e.g. the seed column), in the order of the flattened values, or
    None. With at least 2 distinct groups the interval is a two-level percentile bootstrap (groups,
    then cells within each drawn group); else SciPy's BCa bootstrap over cells, which treats cells
    as independent. Returns {'mean', 'low', 'high', 'cells', 'groups' (distinct groups; 0 without
    groups), 'method'}."""
    cells = _cells(values, "values")
    codes = None if groups is None else _group_codes(groups, cells.size)
    num_groups = 0 if codes is None else int(codes.max()) + 1
    if num_groups >= 2:
        low, high = _grouped_interval(cells, codes, confidence, seed)
        method = GROUPED_METHOD
    else:
        low, high = _bootstrap_interval(cells, confidence, seed) if cells.size > 1 else (float(cells[0]),) * 2
        method = CELL_METHOD
    return {"mean": float(cells.mean()), "low": low, "high": high, "cells": int(cells.size), "groups": num_groups,
            "method": method}


def sign_flip_p(differences, *, resamples: int = _FLIPS, seed: int = 0) -> float:
    """Two-sided p-value of the mean paired difference by a sign-flip permutation test
    (`scipy.stats.permutation_test`, one sample, permutation_type="samples": exact enumeration of
    all 2**n flips when 2**n <= `resamples`, else `resamples` random flips). Zero differences stay
    zero under a flip, so they are kept (the plain Wilcoxon test drops them); all differences zero
    gives 1.0.

    Flipping cells tests the question-level null (no difference on any cell) conditional on the
    trained models: it treats the cells of one seed as exchangeable and so says nothing about other
    training runs. The grouped interval (`mean_interval(..., groups=seeds)`) carries the seed-level
    uncertainty; a verdict needs both."""
    difference = _cells(differences, "differences")
    if not difference.any():
        return 1.0
    result = stats.permutation_test((difference,), np.mean, permutation_type="samples", alternative="two-sided",
                                    n_resamples=resamples, vectorized=True, batch=2000,  # batches bound the memory
                                    random_state=np.random.default_rng(seed))
    return float(min(1.0, result.pvalue))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979): sort ascending, multiply the i-th smallest
    (from 0) by (m − i), take the running maximum, cap at 1, return in the input order. NaN p-values
    stay NaN and do not count in m."""
    p = np.asarray(p_values, dtype=float).ravel()
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    if tested.size:
        order = tested[np.argsort(p[tested], kind="stable")]
        scaled = p[order] * (tested.size - np.arange(tested.size))
        adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def _number(x: float) -> str:
    x = float(x)
    if x == 0:
        return "0"
    return f"{x:.2f}" if abs(x) >= 0.01 else f"{x:.2g}"


def _reading(verdict: str, mean: float, low: float, high: float) -> str:
    if verdict == "no difference":
        return "no difference: every cell is the same"
    if verdict == "lower":
        return f"lower by {_number(-mean)} [{_number(-high)}, {_number(-low)}]"
    if verdict == "higher":
        return f"higher by {_number(mean)} [{_number(low)}, {_number(high)}]: not lower; lower by at most 0"
    return f"inconclusive: lower by at most {_number(max(0.0, -low))}, higher by at most {_number(max(0.0, high))}"


def paired_verdict(baseline, variant, *, groups=None, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Is `variant` lower than `baseline` on the same (seed, question) cells (arrays of one shape)?

    `groups`: one label per cell (the seed), as in `mean_interval`. Returns
    {'mean_difference' (variant − baseline), 'low', 'high' (its interval, grouped when `groups` has 2
    or more seeds), 'p_value' (`sign_flip_p`), 'cells', 'groups', 'interval_method', 'verdict',
    'excludes_lower_by', 'reading'}. The verdict (`VERDICTS`): "no difference" when every difference
    is exactly zero (the variant changed nothing: not a test), "lower" when the whole interval is
    below zero, "higher" when it is above zero, else "inconclusive". `excludes_lower_by` = max(0,
    −low): the largest reduction the interval leaves possible (for a verdict other than "lower", the
    data exclude any larger one). `reading`: the verdict in words, e.g. "lower by 0.12 [0.05, 0.20]"
    or "inconclusive: lower by at most 0.09, higher by at most 0.04". The p-value enters the verdict
    through `holm_verdicts` (the family of a notebook's verdicts)."""
    baseline, variant = np.asarray(baseline, dtype=float), np.asarray(variant, dtype=float)
    if baseline.shape != variant.shape:
        raise ValueError(f"paired cells must have one shape, got {baseline.shape} and {variant.shape}")
    difference = _cells(variant, "variant") - _cells(baseline, "baseline")
    interval = mean_interval(difference, groups=groups, confidence=confidence, seed=seed)
    p_value = sign_flip_p(difference, seed=seed)
    if not difference.any():
        verdict = "no difference"
    elif interval["high"] < 0:
        verdict = "lower"
    elif interval["low"] > 0:
        verdict = "higher"
    else:
        verdict = "inconclusive"
    return {"mean_difference": interval["mean"], "low": interval["low"], "high": interval["high"],
            "p_value": p_value, "cells": interval["cells"], "groups": interval["groups"],
            "interval_method": interval["method"], "verdict": verdict,
            "excludes_lower_by": max(0.0, -interval["low"]),
            "reading": _reading(verdict, interval["mean"], interval["low"], interval["high"])}


def holm_verdicts(table, *, p_column: str = "p_value", alpha: float = ALPHA):
    """One family of verdicts (a notebook's table of `paired_verdict` rows) corrected for
    multiplicity: a copy of `table` with `p_value_holm` (Holm over the rows whose verdict is not one
    of `NOT_TESTED`, e.g. "no difference"; those rows get NaN), and with every "lower" or "higher" whose adjusted p-value
    is not below `alpha` (NaN included) downgraded to "inconclusive" (its `reading` prefixed with
    why): a verdict needs the grouped interval and the family-corrected test."""
    table = table.copy()
    tested = ~table["verdict"].isin(NOT_TESTED).to_numpy()
    adjusted = np.full(len(table), np.nan)
    adjusted[tested] = holm(table.loc[tested, p_column].to_numpy(dtype=float))
    table["p_value_holm"] = adjusted
    downgrade = table["verdict"].isin(["lower", "higher"]).to_numpy() & ~(adjusted < alpha)
    if "reading" in table.columns:
        table.loc[downgrade, "reading"] = [
            f"inconclusive (Holm p = {_number(p) if np.isfinite(p) else 'NaN'} ≥ {alpha:g}; interval alone: {r})"
            for p, r in zip(adjusted[downgrade], table.loc[downgrade, "reading"])]
    table.loc[downgrade, "verdict"] = "inconclusive"
    return table


def paired_verdicts(cells, *, compare: str, reference, metrics: Sequence[str], within: Sequence[str] = (),
                    on: Sequence[str] = ("seed", "question"), reference_role: str = "baseline",
                    sort_cells: bool = False, family: bool = True):
    """`paired_verdict` for many pairs of a long table of cells, one row each: within each group of
    the `within` columns (in the order they first appear), every value of the column `compare` other
    than `reference` against `reference`, on the same cells (`on`), for each of `metrics`. The
    intervals group by the cells' "seed" column (seeds, then questions within).

    `reference_role`: "baseline" (the default) tests whether the other value is lower than the
    reference; "variant" whether the reference is lower than the other value. `sort_cells`: pair the
    cells in the order of `on` (else in the order the reference's cells appear; the order changes only
    the bootstrap's draws). `family`: the returned rows are one family, corrected by `holm_verdicts`
    (column `p_value_holm`, verdicts downgraded where it is not below 0.05); False: no correction.
    Columns: the `within` columns, `compare`, `metric`, `seeds` (distinct seeds of the other value's
    cells), `paired_verdict`'s keys and `p_value_holm`."""
    import pandas as pd

    if reference_role not in ("baseline", "variant"):
        raise ValueError(f"reference_role must be 'baseline' or 'variant', got {reference_role!r}")
    rows = []
    for key, group in (cells.groupby(list(within), sort=False) if within else [((), cells)]):
        key = key if isinstance(key, tuple) else (key,)
        base = group[group[compare] == reference].set_index(list(on))
        base = base.sort_index() if sort_cells else base
        seeds = (base.index.get_level_values("seed") if "seed" in on else base["seed"]).to_numpy()  # the groups
        for value, part in group.groupby(compare, sort=False):
            if value == reference:
                continue
            other = part.set_index(list(on))
            for metric in metrics:
                pair = (base[metric].to_numpy(), other[metric].reindex(base.index).to_numpy())
                verdict = paired_verdict(*(pair if reference_role == "baseline" else pair[::-1]), groups=seeds)
                rows.append({**dict(zip(within, key)), compare: value, "metric": metric,
                             "seeds": int(part["seed"].nunique()), **verdict})
    table = pd.DataFrame(rows)
    return holm_verdicts(table) if family and len(table) else table


def summarise_cells(cells, by: Sequence[str], metrics: Sequence[str], *, confidence: float = CONFIDENCE):
    """Per group of `cells` (a long table, one row per (seed, question) and whatever `by` names),
    for each metric: `<metric>` (the mean over the group's cells), `<metric>_low`, `<metric>_high`
    (its `mean_interval`, grouped by the "seed" column when there is one: seeds, then questions
    within), plus `seeds` (distinct seeds in the group) and `cells`. A DataFrame, one row per group,
    in the order the groups first appear."""
    import pandas as pd

    rows = []
    for key, group in cells.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        seeds = group["seed"].to_numpy() if "seed" in group.columns else None
        for metric in metrics:
            interval = mean_interval(group[metric].to_numpy(), groups=seeds, confidence=confidence)
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
