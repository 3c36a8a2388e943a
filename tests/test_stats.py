"""probunlearn.stats: intervals over (seed, question) cells and paired verdicts (SPEC §6)."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from probunlearn.stats import (VERDICTS, holm, holm_verdicts, mean_interval, paired_verdict, paired_verdicts,
                               sign_flip_p, summarise_cells)


def test_mean_interval_brackets_the_mean_and_narrows_with_more_cells():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.3, 0.1, 12), rng.normal(0.3, 0.1, 400)
    a, b = mean_interval(small), mean_interval(large)
    assert a["low"] < a["mean"] < a["high"] and b["low"] < b["mean"] < b["high"]
    assert b["high"] - b["low"] < a["high"] - a["low"]
    assert a["mean"] == pytest.approx(small.mean()) and a["cells"] == 12
    # ~95 % coverage of the true mean over repeated draws (BCa bootstrap; slack for 60 draws)
    draws = [mean_interval(rng.normal(0.3, 0.1, 30), seed=k) for k in range(60)]
    assert np.mean([d["low"] <= 0.3 <= d["high"] for d in draws]) >= 0.85
    same = mean_interval([0.5, 0.5, 0.5])
    assert same == {"mean": 0.5, "low": 0.5, "high": 0.5, "cells": 3, "groups": 0, "method": "BCa bootstrap over cells"}
    with pytest.raises(ValueError, match="empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([0.1, float("nan")])


def test_paired_verdicts_lower_higher_no_difference_and_inconclusive():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.9, 36)
    lower = paired_verdict(base, base - 0.2 + rng.normal(0, 0.02, 36))
    assert lower["verdict"] == "lower" and lower["high"] < 0 and lower["p_value"] < 1e-3
    assert lower["mean_difference"] == pytest.approx(-0.2, abs=0.02) and lower["cells"] == 36
    assert lower["reading"].startswith("lower by 0.2") and lower["excludes_lower_by"] == pytest.approx(-lower["low"])
    higher = paired_verdict(base, base + 0.1 + rng.normal(0, 0.02, 36))
    assert higher["verdict"] == "higher" and higher["low"] > 0 and higher["excludes_lower_by"] == 0
    assert higher["reading"].startswith("higher by 0.1") and "lower by at most 0" in higher["reading"]
    unchanged = paired_verdict(base, base.copy())  # e.g. adaptive temperature that changed no sample
    assert unchanged["verdict"] == "no difference" and unchanged["p_value"] == 1.0 and unchanged["mean_difference"] == 0
    assert unchanged["reading"] == "no difference: every cell is the same"
    noise = paired_verdict(base, base + rng.normal(0, 0.2, 36))
    assert noise["verdict"] == "inconclusive" and noise["low"] < 0 < noise["high"]
    assert noise["excludes_lower_by"] == pytest.approx(-noise["low"])
    assert noise["reading"].startswith("inconclusive: lower by at most ")
    for verdict in (lower, higher, unchanged, noise):
        assert verdict["verdict"] in VERDICTS and "not lower" not in verdict["reading"].replace("not lower;", "")
    shifted = base + np.linspace(-0.1, 0.3, 36)
    assert paired_verdict(base, shifted)["p_value"] == sign_flip_p(shifted - base)
    with pytest.raises(ValueError, match="one shape"):
        paired_verdict(base, base[:-1])


def test_all_zero_differences_are_no_difference_with_p_one():
    zeros = paired_verdict(np.full(12, 0.4), np.full(12, 0.4), groups=np.repeat([0, 1, 2], 4))
    assert zeros["verdict"] == "no difference" and zeros["p_value"] == 1.0
    assert zeros["low"] == zeros["high"] == 0 and zeros["excludes_lower_by"] == 0 and zeros["groups"] == 3
    assert sign_flip_p(np.zeros(5)) == 1.0


def _seeded_cells(seed_means, question_sd, questions=30, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    values = np.concatenate([m + rng.normal(0, question_sd, questions) for m in seed_means])
    return values, np.repeat(np.arange(len(seed_means)), questions)


def test_grouped_interval_carries_the_seed_to_seed_spread():
    values, seeds = _seeded_cells([-0.2, 0.2, 0.4], 0.01)  # seed effects dwarf the question noise
    grouped, cells = mean_interval(values, groups=seeds), mean_interval(values)
    assert grouped["method"] == "two-level bootstrap (groups, then cells within)" and grouped["groups"] == 3
    assert cells["method"] == "BCa bootstrap over cells" and cells["groups"] == 0
    assert grouped["mean"] == pytest.approx(cells["mean"]) and grouped["cells"] == cells["cells"] == 90
    assert grouped["high"] - grouped["low"] > 5 * (cells["high"] - cells["low"])
    assert grouped["low"] < 0 < grouped["high"]  # three seeds this far apart: no claim about the mean
    assert cells["low"] > 0  # treating 90 cells as independent claims one
    # a seed label per cell is required; a single seed falls back to the cells' bootstrap
    with pytest.raises(ValueError, match="groups has 89 labels for 90 cells"):
        mean_interval(values, groups=seeds[:-1])
    assert mean_interval(values, groups=np.zeros(90))["method"] == "BCa bootstrap over cells"


def test_grouped_interval_is_close_to_the_cells_one_without_a_seed_effect():
    rng = np.random.default_rng(3)
    values, seeds = rng.normal(0.5, 0.1, 300), np.repeat(np.arange(10), 30)
    grouped, cells = mean_interval(values, groups=seeds), mean_interval(values)
    width_grouped, width_cells = grouped["high"] - grouped["low"], cells["high"] - cells["low"]
    assert 0.6 < width_grouped / width_cells < 1.6
    assert grouped["low"] < grouped["mean"] < grouped["high"]
    assert abs(grouped["low"] - cells["low"]) < 0.5 * width_cells
    assert abs(grouped["high"] - cells["high"]) < 0.5 * width_cells


def test_grouped_interval_is_fast_and_reproducible():
    import time
    values, seeds = _seeded_cells([0.1, 0.2, 0.3, 0.4, 0.5], 0.1, questions=80)
    mean_interval(values, groups=seeds)
    tick = time.perf_counter()
    first = mean_interval(values, groups=seeds, seed=7)
    assert time.perf_counter() - tick < 0.25  # 4000 replicates of 400 cells, vectorised (slack for a busy machine)
    assert first == mean_interval(values, groups=seeds, seed=7)


def test_holm_matches_a_hand_computation_and_leaves_nan_alone():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.01, np.nan, 0.04, 0.03, 0.005])
    assert np.isnan(adjusted[1]) and adjusted[[0, 2, 3, 4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]).size == 0


def test_sign_flip_p_is_exact_on_an_enumerable_case():
    d = np.array([1.0, 2.0, 0.0, -0.5, 3.0])
    flips = np.array(np.meshgrid(*[[1.0, -1.0]] * d.size)).reshape(d.size, -1).T  # all 2**5 sign patterns
    means = (flips * d).mean(axis=1)
    expected = np.sum(np.abs(means) >= abs(d.mean()) - 1e-12) / 32
    assert flips.shape == (32, 5) and sign_flip_p(d) == pytest.approx(expected, abs=1e-12)
    # by hand: |sum| >= 5.5 for 4 of the 16 sign patterns of the non-zero cells (±(1 + 2 − 0.5 + 3),
    # ±(1 + 2 + 0.5 + 3)), each counted twice for the two "flips" of the zero cell
    assert expected == 8 / 32
    assert sign_flip_p(-d) == sign_flip_p(d) and sign_flip_p(d, seed=5) == sign_flip_p(d)  # exact: no randomness
    # zero differences are kept and stay zero under a flip: the p-value is that of the non-zero cells
    assert sign_flip_p([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]) == sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)


def test_the_verdict_rests_on_the_paired_differences_not_on_one_run():
    """Two variants whose means differ by one outlier cell are not 'lower': the interval says so."""
    base = np.full(30, 0.5)
    variant = base.copy()
    variant[0] = 0.0  # one run's difference
    assert paired_verdict(base, variant)["verdict"] != "lower"


def test_summarise_cells_groups_and_counts_seeds():
    cells = pd.DataFrame({"seed": [0, 0, 1, 1, 0, 1], "question": [0, 1, 0, 1, 0, 0],
                          "model": ["a", "a", "a", "a", "b", "b"], "score": [0.1, 0.3, 0.2, 0.4, 1.0, 1.0]})
    table = summarise_cells(cells, by=["model"], metrics=["score"])
    assert list(table["model"]) == ["a", "b"] and list(table["seeds"]) == [2, 2] and list(table["cells"]) == [4, 2]
    assert table.loc[0, "score"] == pytest.approx(0.25)
    assert table.loc[0, "score_low"] <= 0.25 <= table.loc[0, "score_high"]
    assert table.loc[1, "score_low"] == table.loc[1, "score_high"] == 1.0


def _verdict_rows():
    rows = [{"variant": v, "verdict": verdict, "p_value": p, "reading": f"{verdict} ..."}
            for v, verdict, p in (("a", "lower", 0.001), ("b", "lower", 0.03), ("c", "higher", 0.02),
                                  ("d", "inconclusive", 0.4), ("e", "no difference", 1.0))]
    return pd.DataFrame(rows)


def test_holm_verdicts_downgrades_verdicts_the_family_does_not_support():
    table = _verdict_rows()
    corrected = holm_verdicts(table).set_index("variant")
    assert list(table["verdict"]) == ["lower", "lower", "higher", "inconclusive", "no difference"]  # a copy
    # m = 4 tested rows: 0.001 * 4, 0.02 * 3, 0.03 * 2 -> running max 0.06, 0.4 * 1 -> 0.4
    assert corrected["p_value_holm"][["a", "b", "c", "d"]].tolist() == pytest.approx([0.004, 0.06, 0.06, 0.4])
    assert np.isnan(corrected.loc["e", "p_value_holm"]) and corrected.loc["e", "verdict"] == "no difference"
    assert corrected.loc["a", "verdict"] == "lower" and corrected.loc["a", "reading"] == "lower ..."
    for row in ("b", "c"):  # interval alone said lower / higher, the adjusted p-value is >= 0.05
        assert corrected.loc[row, "verdict"] == "inconclusive"
        assert corrected.loc[row, "reading"].startswith("inconclusive (Holm p = 0.06")
    assert corrected.loc["d", "verdict"] == "inconclusive" and corrected.loc["d", "reading"] == "inconclusive ..."


def test_paired_verdicts_group_by_seed_and_correct_the_family():
    rng = np.random.default_rng(0)
    rows = []
    for seed, seed_shift in zip(range(3), (-0.1, 0.4, 0.5)):
        for question in range(20):
            base = rng.uniform(0.4, 0.9)
            for variant, value in (("baseline", base), ("same", base), ("better", base - 0.3),
                                   ("seed-driven", base + seed_shift + rng.normal(0, 0.01))):
                rows.append({"seed": seed, "question": question, "variant": variant, "score": value})
    cells = pd.DataFrame(rows).sample(frac=1, random_state=2)
    table = paired_verdicts(cells, compare="variant", reference="baseline", metrics=["score"]).set_index("variant")
    assert (table["groups"] == 3).all() and (table["seeds"] == 3).all() and (table["cells"] == 60).all()
    assert (table["interval_method"] == "two-level bootstrap (groups, then cells within)").all()
    assert "p_value_holm" in table.columns and np.isnan(table.loc["same", "p_value_holm"])
    assert table.loc["same", "verdict"] == "no difference"
    assert table.loc["better", "verdict"] == "lower" and table.loc["better", "p_value_holm"] < 0.05
    # the question-level test alone is small, but one seed of three goes the other way: the grouped
    # interval holds zero, so no verdict
    assert table.loc["seed-driven", "verdict"] == "inconclusive" and table.loc["seed-driven", "p_value"] < 0.05
    assert table.loc["seed-driven", "low"] < 0 < table.loc["seed-driven", "high"]
    raw = paired_verdicts(cells, compare="variant", reference="baseline", metrics=["score"], family=False)
    assert "p_value_holm" not in raw.columns
