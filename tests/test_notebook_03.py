"""Notebook 03 (gradient-ascent baselines, early stopping, model mixing, over seeds), run by papermill on
the smoke profile; asserts on what it recorded."""

import json

import pandas as pd
import pytest

from probunlearn.models import load_model
from probunlearn.utils import load_profile

SMOKE = load_profile("smoke")


@pytest.fixture(scope="module")
def summary(smoke_run):
    return json.loads((smoke_run["results"] / "unlearning" / "summary.json").read_text())


def test_03_ran_every_method_and_seed_with_the_same_budget(smoke_run, summary):
    traces = json.loads((smoke_run["results"] / "unlearning" / "traces.json").read_text())
    assert summary["methods"] == SMOKE["UNLEARN_METHODS"] and summary["seeds"] == SMOKE["UNLEARN_SEEDS"]
    assert sorted(traces) == sorted(f"{m}@seed{s}" for m in SMOKE["UNLEARN_METHODS"] for s in SMOKE["UNLEARN_SEEDS"])
    for run in traces.values():
        assert [r["step"] for r in run["log"]] == list(range(1, SMOKE["UNLEARN_STEPS"] + 1))
        assert run["trace"][0]["step"] == 0 and run["trace"][-1]["step"] == SMOKE["UNLEARN_STEPS"]
        assert run["trace"][0] == {"step": 0, **summary["target_trace"]}  # every run starts at the target
        for key in ("forget_rouge_l_recall", "forget_keyword_hit", "retain_rouge_l_recall", "forget_nll", "retain_nll"):
            assert key in run["trace"][-1]
        assert len(run["trace"][-1]["forget_rouge_l_recall_per_question"]) == SMOKE["UNLEARN_EVAL_QUESTIONS"]
    # gradient ascent pushes the forget answers away even in two smoke steps, for every seed
    for seed in SMOKE["UNLEARN_SEEDS"]:
        assert traces[f"ga@seed{seed}"]["trace"][-1]["forget_nll"] > summary["target_trace"]["forget_nll"]
    # another seed is another run: another adapter initialisation and batch order
    first, second = (traces[f"ga@seed{s}"]["log"][0]["loss"] for s in SMOKE["UNLEARN_SEEDS"][:2])
    assert first != second


def test_03_controls_report_their_choices(summary):
    assert summary["bar"] == pytest.approx(SMOKE["RHO"] * summary["target_score"])
    steps = {0, SMOKE["UNLEARN_STEPS"]}  # EVAL_EVERY 0 on smoke: checkpoints at the start and the end
    assert len(summary["choices"]) == len(SMOKE["UNLEARN_METHODS"]) * len(SMOKE["UNLEARN_SEEDS"])
    for choice in summary["choices"]:
        assert choice["early_stopping_step"] in steps
        assert 0.0 <= choice["mixing_lambda"] <= 1.0 and choice["mixed_" + SMOKE["BAR_METRIC"]] >= summary["bar"]


def test_03_table_over_seeds_and_models(smoke_run, summary):
    results = smoke_run["results"]
    table = pd.read_csv(results / "unlearning" / "matched_utility.csv")
    assert len(table) == 2 + 3 * len(SMOKE["UNLEARN_METHODS"])  # references + 3 variants per method
    assert set(table["variant"]) == {"reference", "uncontrolled", "early stopped", "mixed"}
    controlled = table[table["variant"] != "reference"]
    assert (controlled["seeds"] == len(SMOKE["UNLEARN_SEEDS"])).all()
    for column in ("forget_rouge_l_recall", "forget_keyword_hit", "retain_rouge_l_recall"):
        assert table[column].between(0, 1).all(), column
    tofu = table[table["variant"].isin(["reference", "uncontrolled", "mixed"])]  # TOFU's numbers: these models
    for column in ("utility_accuracy_seed0", "forget_quality_seed0", "model_utility_seed0"):
        assert tofu[column].between(0, 1).all(), column
    assert (controlled["forget_rouge_l_recall_low"] <= controlled["forget_rouge_l_recall"] + 1e-9).all()
    assert (controlled["forget_rouge_l_recall"] <= controlled["forget_rouge_l_recall_high"] + 1e-9).all()
    # the table's means are the means of the per-question cells
    cells = pd.read_csv(results / "unlearning" / "cells.csv")
    ga = cells[(cells["method"] == "ga") & (cells["variant"] == "mixed") & (cells["split"] == "forget")]
    assert len(ga) == SMOKE["UNLEARN_EVAL_QUESTIONS"] * len(SMOKE["UNLEARN_SEEDS"])
    row = controlled[(controlled["method"] == "ga") & (controlled["variant"] == "mixed")].iloc[0]
    assert row["forget_rouge_l_recall"] == pytest.approx(ga["rouge_l_recall"].mean())
    for name in SMOKE["SAVE_MODELS"]:
        for seed in SMOKE["UNLEARN_SEEDS"]:
            meta = json.loads((results / "models" / name / f"seed{seed}" / "probunlearn.json").read_text())
            assert meta["seed"] == seed
    for method in SMOKE["UNLEARN_METHODS"]:
        for name in (method, f"{method}_es", f"{method}_mix"):
            assert (results / summary["models"][f"{name}@seed0"] / "adapter_model.safetensors").exists()
    path = results / summary["models"]["ga_mix@seed0"]
    model, _ = load_model(path)  # as trained: the target with the adapter beside its weights
    assert hasattr(model, "peft_config")
    assert not hasattr(load_model(path, merge=True)[0], "peft_config")  # or merged, a plain model
    for figure in ("03_unlearning_curves", "03_unlearning_nll", "03_matched_utility"):
        assert (results / "figures" / f"{figure}.png").stat().st_size > 1000
    print(f"notebook 03 wall time: {summary['wall_seconds']:.0f} s (in-notebook), "
          f"{smoke_run['seconds']['03_ga_baselines']:.0f} s (papermill)")


def test_03_memorisation_and_privacy_columns(smoke_run, summary):
    """ES, EM, MIA AUC and privleak for every model of the table; the privacy rows behind their means;
    the mixing calibrated on Extraction Strength beside the ROUGE-L one."""
    from probunlearn.privacy import ATTACKS

    results = smoke_run["results"] / "unlearning"
    table = pd.read_csv(results / "matched_utility.csv")
    for column in ("forget_extraction_strength", "retain_extraction_strength", "forget_exact_memorization",
                   *[f"mia_auc_{a}" for a in ATTACKS]):
        assert table[column].between(0, 1).all(), column
    for attack in ATTACKS:
        assert table[f"privleak_{attack}"].notna().all()
        retain = table[table["method"] == "retain model"].iloc[0]
        assert retain[f"privleak_{attack}"] == 0.0  # the reference of privleak is the retain model itself
        target = table[table["method"] == "target"].iloc[0]
        assert target[f"privleak_{attack}"] == pytest.approx(
            (target[f"mia_auc_{attack}"] - retain[f"mia_auc_{attack}"]) / retain[f"mia_auc_{attack}"])
    privacy = pd.read_csv(results / "privacy.csv")
    assert len(privacy) == 3 * len(SMOKE["UNLEARN_METHODS"]) * len(SMOKE["UNLEARN_SEEDS"])
    row = table[(table["method"] == "ga") & (table["variant"] == "uncontrolled")].iloc[0]
    ga = privacy[(privacy["method"] == "ga") & (privacy["variant"] == "uncontrolled")]
    assert row["mia_auc_min_k"] == pytest.approx(ga["mia_auc_min_k"].mean())
    cells = pd.read_csv(results / "cells.csv")
    assert cells[["extraction_strength", "exact_memorization"]].stack().between(0, 1).all()
    calibration = pd.read_csv(results / "calibration.csv")
    assert len(calibration) == len(SMOKE["UNLEARN_METHODS"]) * len(SMOKE["UNLEARN_SEEDS"])
    assert summary["other_bar_metric"] == "retain_extraction_strength"
    for bar in (SMOKE["BAR_METRIC"], "retain_extraction_strength"):
        assert calibration[f"lambda_{bar}"].between(0, 1).all()
    assert summary["other_bar"] == pytest.approx(SMOKE["RHO"] * summary["target_trace"]["retain_extraction_strength"])
