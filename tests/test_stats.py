"""probunlearn.stats: intervals over (seed, question) cells and paired verdicts (SPEC §6)."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from probunlearn.stats import mean_interval, paired_verdict, summarise_cells


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
    assert same == {"mean": 0.5, "low": 0.5, "high": 0.5, "cells": 3}
    with pytest.raises(ValueError, match="empty"):
        mean_interval([])
    with pytest.raises(ValueError, match="NaN"):
        mean_interval([0.1, float("nan")])


def test_paired_verdicts_lower_not_lower_and_inconclusive():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.3, 0.9, 36)
    lower = paired_verdict(base, base - 0.2 + rng.normal(0, 0.02, 36))
    assert lower["verdict"] == "lower" and lower["high"] < 0 and lower["p_value"] < 1e-3
    assert lower["mean_difference"] == pytest.approx(-0.2, abs=0.02) and lower["cells"] == 36
    higher = paired_verdict(base, base + 0.1 + rng.normal(0, 0.02, 36))
    assert higher["verdict"] == "not lower" and higher["low"] >= 0
    unchanged = paired_verdict(base, base.copy())  # e.g. adaptive temperature that changed no sample
    assert unchanged["verdict"] == "not lower" and unchanged["p_value"] == 1.0 and unchanged["mean_difference"] == 0
    noise = paired_verdict(base, base + rng.normal(0, 0.2, 36))
    assert noise["verdict"] == "inconclusive" and noise["low"] < 0 < noise["high"]
    shifted = base + np.linspace(-0.1, 0.3, 36)
    assert paired_verdict(base, shifted)["p_value"] == pytest.approx(scipy_stats.wilcoxon(shifted - base).pvalue)
    with pytest.raises(ValueError, match="one shape"):
        paired_verdict(base, base[:-1])


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
