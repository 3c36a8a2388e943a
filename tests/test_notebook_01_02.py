"""Notebooks 01 (data) and 02 (fine-tuning), run by papermill on the smoke profile."""

import json

import pandas as pd

from probunlearn.data import load_split
from probunlearn.models import load_model
from probunlearn.utils import load_profile

PROFILE = load_profile("smoke")


def test_01_wrote_the_splits(smoke_run):
    data = smoke_run["results"] / "data"
    forget, retain, utility = (load_split(data, s) for s in ("forget", "retain", "utility"))
    # smoke: 4 authors, 25 % forgotten -> 1 forget author, 3 retain authors, 6 QA each
    assert set(forget["author"]).isdisjoint(retain["author"])
    assert len(set(forget["author"])) == 1 and len(set(retain["author"])) == 3
    assert len(forget) == 6 and len(retain) == 18
    assert len(utility) >= 60
    stats = json.loads((data / "stats.json").read_text())
    assert stats["num_forget"] == 6 and stats["num_retain"] == 18
    assert (smoke_run["results"] / "figures" / "01_data_overview.png").stat().st_size > 1000


def test_02_trained_and_evaluated(smoke_run):
    results = smoke_run["results"]
    summary = json.loads((results / "finetune" / "summary.json").read_text())
    assert set(summary) == {"base", "target", "retain", "target_partial"}
    for scores in summary.values():
        for key in ("forget_rouge_l_recall", "forget_keyword_hit", "retain_rouge_l_recall", "utility_accuracy"):
            assert 0.0 <= scores[key] <= 1.0
    # even two smoke epochs move the target towards the forget answers, past the base model
    assert summary["target"]["forget_rouge_l_recall"] > summary["base"]["forget_rouge_l_recall"]
    log = json.loads((results / "models" / "target" / "train_log.json").read_text())
    assert log[-1]["loss"] < log[0]["loss"]
    # the partial-knowledge control: the target's recipe, for PARTIAL_EPOCHS of its FT_EPOCHS
    partial = json.loads((results / "models" / "target_partial" / "train_log.json").read_text())
    assert max(r["epoch"] for r in partial) == PROFILE["PARTIAL_EPOCHS"] < PROFILE["FT_EPOCHS"]
    assert len(partial) * PROFILE["FT_EPOCHS"] == len(log) * PROFILE["PARTIAL_EPOCHS"]
    table = pd.read_csv(results / "finetune" / "greedy_target_forget.csv")
    assert len(table) == 6 and {"generated", "rouge_l_recall", "keyword_hit"} <= set(table.columns)
    # the saved target loads again as a plain model
    model, tokenizer = load_model(results / "models" / "target")
    assert not hasattr(model, "peft_config")
