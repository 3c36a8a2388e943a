"""Notebook 05 (probabilistic evaluation), run by papermill on the smoke profile."""

import json

import numpy as np
import pandas as pd

from probunlearn.probabilistic import load_split_results
from probunlearn.utils import load_profile

PROFILE = load_profile("smoke")
TOL = 1e-9


def test_05_evaluated_every_model_and_seed(smoke_run):
    results = smoke_run["results"]
    out = results / "probabilistic"
    recorded = json.loads((out / "summary.json").read_text())
    models = recorded["models"]
    assert models == [m for m in ("base", "target", "retain", "ga", "ga_es", "ga_mix", "npo_mix") if m in PROFILE["EVAL_MODELS"]]
    # unlearned models once per seed, each with its own sampling seed; the others once, with the first seed
    runs = {tuple(r) for r in recorded["runs"]}
    first = PROFILE["UNLEARN_SEEDS"][0]
    for name in models:
        seeds = PROFILE["UNLEARN_SEEDS"] if (results / "models" / name / f"seed{first}").exists() else [first]
        assert {s for m, s in runs if m == name} == set(seeds), name
    n, questions = PROFILE["NUM_SAMPLES"], {"forget": PROFILE["EVAL_QUESTIONS"], "retain": PROFILE["RETAIN_QUESTIONS"]}
    assert recorded["num_samples"] == n and recorded["alpha"] == PROFILE["ALPHA"]
    cells = pd.read_csv(out / "cells.csv")
    for name, seed in runs:
        for split in ("forget", "retain"):
            table, raw = load_split_results(out, f"{name}/seed{seed}", split)
            assert len(table) == questions[split] and len(raw["samples"]) == questions[split]
            assert raw["scores"].shape == raw["leaks"].shape == (questions[split], n)
            for column in ("greedy_rouge_l", "greedy_leak", "mean_rouge_l", "max_rouge_l", "leak_rate",
                           "m_bin", "m_mu", "m_sigma"):
                assert table[column].between(0, 1).all(), (name, split, column)
            # the bounds sit above what the samples show
            assert (table["m_bin"] >= table["leak_rate"] - TOL).all()
            assert (table["m_mu"] >= table["mean_rouge_l"] - TOL).all()
            assert (table["m_sigma"] >= raw["scores"].std(axis=1) - TOL).all()
            assert (table["max_rouge_l"] >= table["mean_rouge_l"] - TOL).all()
            np.testing.assert_allclose(table["ed"], table["m_mu"] + PROFILE["ED_WEIGHT"] * table["m_sigma"])
            np.testing.assert_allclose(table["leak_rate"], raw["leaks"].mean(axis=1))
            np.testing.assert_allclose(table["mean_rouge_l"], raw["scores"].mean(axis=1), atol=1e-5)
            mine = cells[(cells["model"] == name) & (cells["seed"] == seed) & (cells["split"] == split)]
            np.testing.assert_allclose(mine["leaks_within_n"], (raw["leaks"].sum(axis=1) > 0).astype(float))
    overview = pd.read_csv(out / "overview.csv")
    assert {"seeds", "m_bin_low", "m_bin_high", "leaks_within_n"} <= set(overview.columns)
    assert ((overview["m_bin_low"] <= overview["m_bin"] + TOL) & (overview["m_bin"] <= overview["m_bin_high"] + TOL)).all()
    headline = pd.DataFrame(recorded["headline"])
    assert list(headline["model"]) == models
    assert set(headline["greedy_vs_sampled"]) <= {"lower", "not lower", "inconclusive"}
    forget_cells = cells[cells["split"] == "forget"].groupby("model")
    np.testing.assert_allclose(headline.set_index("model")["leaks_within_n"], forget_cells["leaks_within_n"].mean()[models])
    np.testing.assert_allclose(headline.set_index("model")["difference"],
                               (forget_cells["greedy_leak"].mean() - forget_cells["leaks_within_n"].mean())[models], atol=1e-9)
    # the fine-tuned target answers its forget questions better than the retain model, greedily (0.62 against
    # 0.45 here). Sampled at T = 1, this profile's 2-epoch target is not told apart from the retain model
    # (0.25 against 0.23 on transformers 5.24, 0.24 against 0.25 on 5.19, 3 questions x 8 samples): that
    # claim needs the cpu profile's sizes (README "Results": target M_bin 0.97, retain at the n = 16 floor).
    by_model = overview[overview["split"] == "forget"].set_index("model")
    assert by_model.loc["target", "greedy_rouge_l"] > by_model.loc["retain", "greedy_rouge_l"]


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
    assert not (smoke_run["figures"] / "05_coverage.png").exists()  # only notebook 07 writes ../figures
