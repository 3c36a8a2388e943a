"""Notebook 03 (gradient-ascent baselines, early stopping, model mixing), run by papermill on the
smoke profile; asserts on what it recorded."""

import json

import pandas as pd
import pytest

from probunlearn.models import load_model
from probunlearn.utils import load_profile

SMOKE = load_profile("smoke")


@pytest.fixture(scope="module")
def summary(smoke_run):
    return json.loads((smoke_run["results"] / "unlearning" / "summary.json").read_text())


def test_03_ran_every_method_with_the_same_budget(smoke_run, summary):
    traces = json.loads((smoke_run["results"] / "unlearning" / "traces.json").read_text())
    assert summary["methods"] == SMOKE["UNLEARN_METHODS"] == list(traces)
    for method, run in traces.items():
        assert [r["step"] for r in run["log"]] == list(range(1, SMOKE["UNLEARN_STEPS"] + 1))
        assert run["trace"][0]["step"] == 0 and run["trace"][-1]["step"] == SMOKE["UNLEARN_STEPS"]
        assert run["trace"][0] == {"step": 0, **summary["target_trace"]}  # every method starts at the target
        for key in ("forget_rouge_l_recall", "forget_keyword_hit", "retain_rouge_l_recall", "forget_nll", "retain_nll"):
            assert key in run["trace"][-1]
    # gradient ascent pushes the forget answers away even in two smoke steps
    assert traces["ga"]["trace"][-1]["forget_nll"] > summary["target_trace"]["forget_nll"]


def test_03_controls_report_their_choices(summary):
    assert summary["bar"] == pytest.approx(SMOKE["RHO"] * summary["target_score"])
    steps = {0, SMOKE["UNLEARN_STEPS"]}  # EVAL_EVERY 0 on smoke: checkpoints at the start and the end
    for method in summary["methods"]:
        stop, mix = summary["early_stopping"][method], summary["mixing"][method]
        assert stop["step"] in steps and stop["met"]
        assert stop[SMOKE["BAR_METRIC"]] >= summary["bar"]
        assert 0.0 <= mix["lambda"] <= 1.0 and mix["met"] and mix["score"] >= summary["bar"]


def test_03_table_and_models(smoke_run, summary):
    results = smoke_run["results"]
    table = pd.read_csv(results / "unlearning" / "matched_utility.csv")
    assert len(table) == 2 + 3 * len(SMOKE["UNLEARN_METHODS"])  # references + 3 variants per method
    assert set(table["variant"]) == {"reference", "uncontrolled", "early stopped", "mixed"}
    for column in ("forget_rouge_l_recall", "forget_keyword_hit", "retain_rouge_l_recall", "utility_accuracy",
                   "forget_quality", "model_utility"):
        assert table[column].between(0, 1).all(), column
    for name in SMOKE["SAVE_MODELS"]:
        assert (results / "models" / name / "probunlearn.json").exists()
    for method in SMOKE["UNLEARN_METHODS"]:
        for name in (method, f"{method}_es", f"{method}_mix"):
            assert (results / summary["models"][name] / "adapter_model.safetensors").exists()
    model, _ = load_model(results / summary["models"]["ga_mix"])  # loads as a plain model on the target
    assert not hasattr(model, "peft_config")
    for figure in ("03_unlearning_curves", "03_unlearning_nll", "03_mixing", "03_matched_utility"):
        assert (results / "figures" / f"{figure}.png").stat().st_size > 1000
    print(f"notebook 03 wall time: {summary['wall_seconds']:.0f} s (in-notebook), "
          f"{smoke_run['seconds']['03_ga_baselines']:.0f} s (papermill)")
