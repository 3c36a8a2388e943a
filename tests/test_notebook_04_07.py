"""Notebooks 04 (entropy optimisation, here with LoRA dynamics, its regime test, adaptive temperature in both readings) and 07
(every figure), run by papermill on the smoke profile; asserts on what they recorded and wrote."""

import json

import numpy as np
import pandas as pd
import pytest

from probunlearn.stats import NOT_TESTED, VERDICTS
from probunlearn.utils import load_profile

SMOKE = load_profile("smoke")
# what notebook 07 promises (its header table): every figure as PNG and PDF, every table as .md and .csv
FIGURES = ["headline_greedy_vs_sampled", "bounds_vs_samples", "entropy_dynamics", "entropy_temperature", "attacks",
           "unlearning_curves", "forget_utility_tradeoff", "bound_coverage", "finetune_knowledge"]
TABLES = ["table_finetune", "table_matched_utility", "table_matched_utility_verdicts", "table_ranking", "table_probabilistic", "table_claim",
          "table_claim_verdicts", "table_facts", "table_entropy",
          "table_entropy_verdicts", "table_entropy_runs", "table_mixing_calibration", "table_attacks", "table_attacks_verdicts"]
VARIANTS = ["baseline", "+ AT (entropy)", "+ AT (confidence)", "+ entropy", "+ entropy + AT (entropy)",
            "+ entropy + AT (confidence)"]


@pytest.fixture(scope="module")
def entropy_dir(smoke_run):
    return smoke_run["results"] / "entropy"


def test_04_headline_has_every_variant_and_seed(entropy_dir):
    headline = pd.read_csv(entropy_dir / "headline.csv")
    methods = SMOKE["ENTROPY_METHODS"]
    assert len(headline) == len(methods) * len(VARIANTS)
    assert set(headline["condition"]) == {"best point above the bar"}
    for method, rows in headline.groupby("method"):
        assert method in methods and sorted(rows["variant"]) == sorted(VARIANTS)
    assert (headline["seeds"] == len(SMOKE["UNLEARN_SEEDS"])).all()
    for column in ("forget_m_bin", "forget_m_bin_low", "forget_m_bin_high", "forget_greedy_leak", "forget_leaks_within_n",
                   "retain_distinct_2", "forget_fire_rate", "retain_fire_rate"):
        assert headline[column].between(0, 1).all(), column
    assert ((headline["forget_m_bin_low"] <= headline["forget_m_bin"] + 1e-9)
            & (headline["forget_m_bin"] <= headline["forget_m_bin_high"] + 1e-9)).all()
    assert (headline.loc[~headline["variant"].str.contains("AT"), "forget_fire_rate"] == 0).all()


def test_04_cells_readings_and_an_honest_verdict_family(entropy_dir):
    cells = pd.read_csv(entropy_dir / "cells.csv")
    # the low branch of both readings keeps the argmax: greedy answers are those of plain sampling
    for _, group in cells.groupby(["seed", "method", "entropy", "split"]):
        by_mode = group.pivot(index="question", columns="mode", values="greedy_rouge_l")
        assert (by_mode.nunique(axis=1) == 1).all()
    assert set(cells["mode"]) == {"plain", "entropy", "confidence"}
    assert (cells.loc[cells["mode"] == "confidence", "threshold"] == SMOKE["AT_CONFIDENCE"]).all()
    # the entropy reading's h_tau is the quantile of the model's own retain-step entropies
    entropies = np.load(entropy_dir / "entropies.npz")
    seed = SMOKE["UNLEARN_SEEDS"][0]
    for method in SMOKE["ENTROPY_METHODS"]:
        rows = cells[(cells["mode"] == "entropy") & ~cells["entropy"] & (cells["seed"] == seed) & (cells["method"] == method)]
        retain = entropies[f"{method}_seed{seed}__retain"]
        assert rows["threshold"].iloc[0] == pytest.approx(float(np.quantile(retain, SMOKE["AT_QUANTILE"], method="lower")))
    verdicts = pd.read_csv(entropy_dir / "verdicts.csv")
    summary = json.loads((entropy_dir / "summary.json").read_text())
    # every variant is a verdict row or a dropped copy of an earlier one, never both
    assert len(verdicts) + len(summary["dropped"]) == len(SMOKE["ENTROPY_METHODS"]) * (len(VARIANTS) - 1)
    assert set(verdicts["verdict"]) <= set(VERDICTS) | set(NOT_TESTED) and (verdicts["low"] <= verdicts["high"] + 1e-12).all()
    assert verdicts.loc[verdicts["verdict"].isin(NOT_TESTED), "p_value_holm"].isna().all()
    assert (verdicts["cells"] == len(SMOKE["UNLEARN_SEEDS"]) * SMOKE["ENTROPY_QUESTIONS"]).all()
    assert summary["entropy_positions"] == SMOKE["ENTROPY_POSITIONS"] and summary["seeds"] == SMOKE["UNLEARN_SEEDS"]
    assert summary["tuning"] == SMOKE["DYNAMICS_TUNING"] == "lora" and summary["entropy_pad_to"] == SMOKE["ENTROPY_PAD_TO"]


def test_04_dynamics_runs_and_figures(smoke_run, entropy_dir):
    dynamics = pd.read_csv(entropy_dir / "dynamics.csv")
    runs = pd.read_csv(entropy_dir / "runs.csv")
    every, bar = SMOKE["DYNAMICS_EVAL_EVERY"], json.loads((entropy_dir / "summary.json").read_text())["bar"]
    assert len(runs) == len(SMOKE["UNLEARN_SEEDS"]) * len(SMOKE["ENTROPY_METHODS"]) * 2
    for (seed, method, entropy), part in dynamics.groupby(["seed", "method", "entropy"]):
        steps = part["step"].tolist()
        assert steps[0] == 0 and all(s % every == 0 for s in steps[:-1])
        assert part[["forget_m_bin", "forget_greedy_leak", "forget_rouge_l_recall", "retain_rouge_l_recall"]].stack().between(0, 1).all()
        run = runs[(runs["seed"] == seed) & (runs["method"] == method) & (runs["entropy"] == entropy)].iloc[0]
        assert run["best_step"] in steps and run["steps_run"] == steps[-1]
        best = part[part["step"] == run["best_step"]].iloc[0]
        assert best["retain_rouge_l_recall"] >= bar and best["forget_m_bin"] == pytest.approx(run["forget_m_bin"])
        assert best["forget_m_bin"] == part.loc[part["retain_rouge_l_recall"] >= bar, "forget_m_bin"].min()
    start = dynamics[dynamics["step"] == 0]
    assert start["forget_m_bin"].nunique() == 1  # every run starts at the target (a fresh adapter adds nothing)
    assert dynamics.groupby(["seed", "entropy"])["forget_rouge_l_recall"].nunique().max() > 1  # and the adapter moved it
    firing = pd.read_csv(entropy_dir / "firing.csv")
    assert firing.groupby(["seed", "variant"])["fires_forget"].apply(lambda v: v.is_monotonic_increasing).all()
    for figure in ("04_dynamics", "04_entropy_temperature", "04_entropy_distributions"):
        assert (smoke_run["results"] / "figures" / f"{figure}.png").stat().st_size > 1000


def test_04_two_phase_arms_continue_from_plain_best_point_and_are_judged_against_the_control(smoke_run, entropy_dir):
    cells = pd.read_csv(entropy_dir / "two_phase_cells.csv")
    eo_arms = [f"+ entropy (λ_f = {w:g})" for w in SMOKE["TWO_PHASE_WEIGHTS"]]
    alone = [f"entropy only (λ_f = {w:g})" for w in SMOKE["TWO_PHASE_WEIGHTS"]]
    assert SMOKE["TWO_PHASE_KINDS"] == ["with_objective", "entropy_only"]  # both kinds exercised here
    assert SMOKE["TWO_PHASE_STEPS"] > 0 and sorted(set(cells["variant"])) == sorted(["start", "continued", *eo_arms, *alone])
    sizes = cells.groupby(["variant", "split"]).size().unstack()
    seeds = len(SMOKE["UNLEARN_SEEDS"]) * len(SMOKE["ENTROPY_METHODS"])
    assert (sizes["forget"] == seeds * SMOKE["ENTROPY_QUESTIONS"]).all()
    assert (sizes["retain"] == seeds * SMOKE["ENTROPY_RETAIN_QUESTIONS"]).all()
    # the start is the regime test's baseline, cell for cell (same model, same sampling seed)
    regime = pd.read_csv(entropy_dir / "cells.csv")
    baseline = regime[(regime["mode"] == "plain") & ~regime["entropy"]].set_index(["seed", "method", "split", "question"])
    start = cells[cells["variant"] == "start"].set_index(["seed", "method", "split", "question"])
    assert np.allclose(start["m_bin"], baseline.loc[start.index, "m_bin"])
    # every + EO arm is judged against the continued control on the forget cells; the term alone against the start
    verdicts = pd.read_csv(entropy_dir / "two_phase_verdicts.csv")
    assert set(verdicts["variant"]) <= set(eo_arms) | set(alone) and len(verdicts) >= 1
    assert (verdicts["against"] == verdicts["variant"].map(lambda v: "start" if v in alone else "continued")).all()
    summary = json.loads((entropy_dir / "summary.json").read_text())["two_phase"]
    assert summary["kinds"] == SMOKE["TWO_PHASE_KINDS"]
    assert (verdicts["cells"] == seeds * SMOKE["ENTROPY_QUESTIONS"]).all()
    assert set(verdicts["verdict"]) <= set(VERDICTS) | set(NOT_TESTED)
    headline = pd.read_csv(entropy_dir / "two_phase.csv")
    bar = json.loads((entropy_dir / "summary.json").read_text())["bar"]
    assert len(headline) == len(SMOKE["ENTROPY_METHODS"]) * (2 + len(eo_arms) + len(alone))
    assert (headline["retain_above_bar"] == (headline["retain_greedy_rouge_l"] >= bar)).all()
    assert json.loads((entropy_dir / "summary.json").read_text())["two_phase"]["steps"] == SMOKE["TWO_PHASE_STEPS"]
    assert (smoke_run["results"] / "figures" / "04_two_phase.png").stat().st_size > 1000


def test_07_writes_every_figure_and_table_it_promises(smoke_run):
    figures = smoke_run["figures"]
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (figures / f"{name}.{ext}").stat().st_size > 1000, f"{name}.{ext}"
    for name in TABLES:
        assert len(pd.read_csv(figures / f"{name}.csv")) > 0
        assert (figures / f"{name}.md").read_text().startswith("|")
    written = {p.stem for p in figures.iterdir()}
    assert written == set(FIGURES) | set(TABLES)  # nothing unannounced
    matched = pd.read_csv(figures / "table_matched_utility.csv")
    assert set(matched["variant"]) == {"reference", "uncontrolled", "early stopped", "mixed"}
    assert {"seeds", "forget_rouge_l_recall_low", "forget_rouge_l_recall_high"} <= set(matched.columns)
    assert {"seeds", "forget_m_bin_low", "forget_m_bin_high"} <= set(pd.read_csv(figures / "table_entropy.csv").columns)
    assert "seeds" in pd.read_csv(figures / "table_probabilistic.csv").columns
