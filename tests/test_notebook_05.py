"""Notebook 05 (probabilistic evaluation), run by papermill on the smoke profile."""

import json

import numpy as np
import pandas as pd

from probunlearn.models import META_FILE
from probunlearn.probabilistic import load_split_results
from probunlearn.utils import load_profile

PROFILE = load_profile("smoke")
TOL = 1e-9


def test_05_evaluated_every_model(smoke_run):
    results = smoke_run["results"]
    out = results / "probabilistic"
    recorded = json.loads((out / "summary.json").read_text())
    models = recorded["models"]
    saved = {p.name for p in (results / "models").iterdir() if (p / META_FILE).exists() or (p / "config.json").exists()}
    assert models[:3] == ["base", "target", "retain"] and set(models) == {"base"} | saved
    n, questions = PROFILE["NUM_SAMPLES"], PROFILE["EVAL_QUESTIONS"]
    assert recorded["num_samples"] == n and recorded["alpha"] == PROFILE["ALPHA"]
    for name in models:
        for split in ("forget", "retain"):
            table, raw = load_split_results(out, name, split)
            assert len(table) == questions and len(raw["samples"]) == questions
            assert raw["scores"].shape == raw["leaks"].shape == (questions, n)
            for column in ("greedy_rouge_l", "greedy_leak", "mean_rouge_l", "max_rouge_l", "leak_rate",
                           "m_bin", "m_mu", "m_sigma"):
                assert table[column].between(0, 1).all(), (name, split, column)
            # the bounds sit above what the samples show
            assert (table["m_bin"] >= table["leak_rate"] - TOL).all()
            assert (table["m_mu"] >= table["mean_rouge_l"] - TOL).all()
            assert (table["m_sigma"] >= raw["scores"].std(axis=1) - TOL).all()
            assert (table["max_rouge_l"] >= table["mean_rouge_l"] - TOL).all()
            np.testing.assert_allclose(table["ed"], table["m_mu"] + PROFILE["ED_LAMBDA"] * table["m_sigma"])
            np.testing.assert_allclose(table["leak_rate"], raw["leaks"].mean(axis=1))
            np.testing.assert_allclose(table["mean_rouge_l"], raw["scores"].mean(axis=1), atol=1e-5)
            summary = recorded["summary"][name][split]
            assert summary["questions"] == questions and summary["samples"] == n
            assert summary["frac_m_bin_above"] == float((table["m_bin"] > PROFILE["MBIN_THRESHOLD"]).mean())
            leak_curve = [summary[f"leak_at_{k}"] for k in (1, 2, 4, 8) if k <= n]
            assert leak_curve == sorted(leak_curve) and summary["leak_at_1"] == summary["leak_rate"]
    # the fine-tuned target knows its forget answers better than the base model, sampled too
    assert recorded["summary"]["target"]["forget"]["mean_rouge_l"] > recorded["summary"]["base"]["forget"]["mean_rouge_l"]


def test_05_curves_coverage_and_figures(smoke_run):
    results = smoke_run["results"]
    out = results / "probabilistic"
    models = json.loads((out / "summary.json").read_text())["models"]
    curves = pd.read_csv(out / "bounds_vs_n.csv")
    for _, part in curves.groupby("model"):
        assert part["n"].tolist() == sorted(part["n"]) and part["n"].max() == PROFILE["NUM_SAMPLES"]
        assert part["m_bin"].is_monotonic_decreasing and (part["m_mu"] >= part["mean_rouge_l"] - TOL).all()
    assert set(curves["model"]) == set(models)
    leak_at_k = pd.read_csv(out / "leak_at_k.csv")
    assert set(leak_at_k["model"]) == set(models) and leak_at_k["leak_at_k"].between(0, 1).all()
    coverage = pd.read_csv(out / "coverage.csv")
    alpha, trials = PROFILE["COVERAGE_ALPHA"], PROFILE["COVERAGE_TRIALS"]
    slack = 3 * np.sqrt(alpha * (1 - alpha) / trials)
    allowed = np.where(coverage["bound"] == "ed", 2 * alpha, alpha) + slack
    assert (coverage["failure_rate"] <= allowed).all(), coverage[coverage["failure_rate"] > allowed]
    assert coverage["distribution"].nunique() == 5  # four textbook distributions and the model's scores
    for figure in ("05_sampled_vs_greedy", "05_mbin_share", "05_leak_at_k", "05_bounds_vs_n", "05_coverage"):
        assert (results / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    assert not (smoke_run["figures"] / "05_coverage.png").exists()  # only notebook 06 writes ../figures
