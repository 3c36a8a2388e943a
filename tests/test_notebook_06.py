"""Notebook 06 (the attacks: relearning and 4-/8-bit quantisation beside greedy and sampled leakage),
run by papermill on the smoke profile; asserts on what it recorded."""

import json

import pandas as pd
import pytest

from probunlearn.attacks import VERDICT_NAMES
from probunlearn.utils import load_profile

SMOKE = load_profile("smoke")
ATTACKS = ["none", "relearned", *SMOKE["ATTACK_QUANTIZATIONS"]]


@pytest.fixture(scope="module")
def attacks_dir(smoke_run):
    return smoke_run["results"] / "attacks"


def test_06_measures_every_model_seed_and_attack_on_held_out_questions(smoke_run, attacks_dir):
    summary = json.loads((attacks_dir / "summary.json").read_text())
    assert summary["attacks"] == ATTACKS and summary["samples"] == SMOKE["ATTACK_SAMPLES"]
    assert summary["models"] == [*SMOKE["ATTACK_REFERENCES"], *SMOKE["ATTACK_MODELS"]]
    assert summary["seeds"] == SMOKE["ATTACK_SEEDS"]
    cells = pd.read_csv(attacks_dir / "cells.csv")
    per_seed = {**{m: 1 for m in SMOKE["ATTACK_REFERENCES"]}, **{m: len(SMOKE["ATTACK_SEEDS"]) for m in SMOKE["ATTACK_MODELS"]}}
    assert set(cells["model"]) == set(per_seed)
    for (model, attack), part in cells.groupby(["model", "attack"]):
        assert attack in ATTACKS
        assert len(part) == per_seed[model] * SMOKE["ATTACK_QUESTIONS"], (model, attack)
    assert cells[["greedy_leak", "leaks_within_n", "m_bin"]].stack().between(0, 1).all()
    # M_bin is an upper bound: never below the share of leaking samples it bounds
    assert (cells["m_bin"] >= cells["leak_rate"] - 1e-9).all()
    # relearning half and measured half are disjoint halves of the forget set
    forget = [json.loads(line) for line in (smoke_run["results"] / "data" / "forget.jsonl").read_text().splitlines()]
    per_author = pd.Series([r["author"] for r in forget]).value_counts()
    assert summary["relearn_questions"] == sum((n + 1) // 2 for n in per_author)  # every other question of each author
    assert summary["measured_questions"] == SMOKE["ATTACK_QUESTIONS"]
    # relearning and quantisation change the model: some answer differs from the unattacked one
    scores = cells.pivot_table(index=["model", "seed", "question"], columns="attack", values="mean_rouge_l")
    assert any((scores[attack] != scores["none"]).any() for attack in ATTACKS[1:])


def test_06_table_verdicts_weights_and_figure(smoke_run, attacks_dir):
    table = pd.read_csv(attacks_dir / "table.csv")
    cells = pd.read_csv(attacks_dir / "cells.csv")
    for _, row in table.iterrows():
        part = cells[(cells["model"] == row["model"]) & (cells["attack"] == row["attack"])]
        assert row["m_bin"] == pytest.approx(part["m_bin"].mean())
        assert row["m_bin_low"] <= row["m_bin"] + 1e-9 <= row["m_bin_high"] + 2e-9
    verdicts = pd.read_csv(attacks_dir / "verdicts.csv")
    assert len(verdicts) == len(table["model"].unique()) * (len(ATTACKS) - 1) * 2
    assert set(verdicts["verdict"]) <= set(VERDICT_NAMES.values())
    # the verdict's difference is attacked minus unattacked, on the same cells
    row = verdicts[(verdicts["model"] == SMOKE["ATTACK_MODELS"][0]) & (verdicts["attack"] == "4bit")
                   & (verdicts["metric"] == "m_bin")].iloc[0]
    part = cells[cells["model"] == SMOKE["ATTACK_MODELS"][0]]
    expected = part[part["attack"] == "4bit"]["m_bin"].mean() - part[part["attack"] == "none"]["m_bin"].mean()
    assert row["difference"] == pytest.approx(expected)
    assert row["difference_low"] <= row["difference"] + 1e-9 <= row["difference_high"] + 2e-9
    weights = pd.read_csv(attacks_dir / "weights.csv")
    assert set(weights["model"]) == {m for m in [*SMOKE["ATTACK_REFERENCES"], *SMOKE["ATTACK_MODELS"]] if m != "target"}
    assert weights["nf4_codes_changed"].between(0, 1).all() and (weights["relative_update"] > 0).all()
    assert (smoke_run["results"] / "figures" / "06_attacks.png").stat().st_size > 1000
