"""Every notebook on the tofu-smoke profile, run by papermill: the paper profile's code paths (TOFU's
split files read from disk through the hub's mapping, 4-bit NF4 QLoRA), offline, at smoke sizes."""

import json

import pandas as pd
import pytest

from probunlearn.data import load_split
from probunlearn.utils import load_profile

TOFU_SMOKE = load_profile("tofu-smoke")
PAPER = load_profile("paper")
# settings that are not sizes: the paper profile's code paths, the same here
CODE_PATHS = ("QUANTIZATION", "DATA_SOURCE", "TEMPERATURE", "TOP_P", "ALPHA", "LEAK_TAU", "RHO", "BAR_METRIC",
              "NPO_BETA", "ENTROPY_POSITIONS", "DYNAMICS_TUNING", "ATTACK_QUANTIZATIONS")


def test_tofu_smoke_is_the_paper_profile_at_smoke_sizes():
    assert set(TOFU_SMOKE) == set(PAPER)
    assert {k: TOFU_SMOKE[k] for k in CODE_PATHS} == {k: PAPER[k] for k in CODE_PATHS}
    assert TOFU_SMOKE["QUANTIZATION"] == "4bit" and TOFU_SMOKE["EXPORT_TOFU"] and not PAPER["EXPORT_TOFU"]


def test_01_exports_tofu_files_and_reads_them_back_as_tofu(tofu_smoke_run):
    results = tofu_smoke_run["results"]
    files = {p.stem for p in (results / "tofu").glob("*.json")}
    assert files == {"full", "forget10", "forget10_perturbed", "retain90", "retain_perturbed",
                     "real_authors_perturbed", "world_facts_perturbed", "holdout10"}
    first = json.loads((results / "tofu" / "forget10_perturbed.json").read_text().splitlines()[0])
    assert set(first) == {"question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer"}
    data = results / "data"
    forget, retain, retain_train, utility = (load_split(data, s) for s in ("forget", "retain", "retain_train", "utility"))
    qa = TOFU_SMOKE["QA_PER_AUTHOR"]
    # forget10 of 10 authors: one author's block of QA; the retain model trains on the other nine (retain90)
    assert len(forget) == qa and len(set(forget["author"])) == 1
    assert len(retain_train) == 9 * qa and set(forget["author"]).isdisjoint(retain_train["author"])
    assert all(k == [] for k in forget["keywords"])  # TOFU has no keywords: ROUGE-L decides leaks
    assert len(utility) > 0 and len(retain) == 9 * qa


def test_02_fine_tunes_in_4bit(tofu_smoke_run):
    results = tofu_smoke_run["results"]
    meta = json.loads((results / "models" / "target" / "probunlearn.json").read_text())
    assert meta["settings"]["quantization"] == "4bit"
    log = json.loads((results / "models" / "target" / "train_log.json").read_text())
    assert log[-1]["loss"] < log[0]["loss"]
    summary = json.loads((results / "finetune" / "summary.json").read_text())
    assert summary["target"]["forget_rouge_l_recall"] > summary["base"]["forget_rouge_l_recall"]


def test_03_to_07_ran_the_4bit_unlearning_evaluation_and_figures(tofu_smoke_run):
    results = tofu_smoke_run["results"]
    summary = json.loads((results / "unlearning" / "summary.json").read_text())
    assert summary["methods"] == TOFU_SMOKE["UNLEARN_METHODS"] and summary["seeds"] == TOFU_SMOKE["UNLEARN_SEEDS"]
    traces = json.loads((results / "unlearning" / "traces.json").read_text())
    # gradient ascent, GA + mismatch and NPO (reference: the disabled adapter on the 4-bit target) move the forget answers away
    for method in TOFU_SMOKE["UNLEARN_METHODS"]:
        assert traces[f"{method}@seed0"]["trace"][-1]["forget_nll"] > summary["target_trace"]["forget_nll"]
    table = pd.read_csv(results / "unlearning" / "matched_utility.csv")
    for column in ("forget_quality_seed0", "model_utility_seed0"):
        assert table[column].dropna().between(0, 1).all() and table[column].notna().any(), column
    cells = pd.read_csv(results / "probabilistic" / "cells.csv")
    assert cells["m_bin"].between(0, 1).all() and len(cells) > 0
    entropy = json.loads((results / "entropy" / "summary.json").read_text())
    assert entropy["tuning"] == TOFU_SMOKE["DYNAMICS_TUNING"] == "full"  # the paper profile's recipe; LoRA runs on smoke
    attacks = json.loads((results / "attacks" / "summary.json").read_text())
    assert attacks["attacks"] == ["none", "relearned", *TOFU_SMOKE["ATTACK_QUANTIZATIONS"]]
    assert (tofu_smoke_run["figures"] / "headline_greedy_vs_sampled.png").stat().st_size > 1000


@pytest.mark.parametrize("notebook", ["02_finetune", "03_ga_baselines", "04_entropy_temperature",
                                      "05_probabilistic_evaluation", "06_attacks"])
def test_no_merge_into_4bit_weights(tofu_smoke_run, notebook):
    # adapters are merged in full precision and then quantised (one rounding), never merged into 4-bit layers,
    # and no product runs through bitsandbytes' CPU kernel that has no backward pass
    executed = json.loads(tofu_smoke_run["executed"][notebook].read_text())
    text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    assert "Merge lora module to 4-bit linear" not in text
    assert "gemv_4bit: an autograd kernel was not registered" not in text


def lines_with(text: str, *words: str) -> list[str]:
    """The lines of `text` that contain any of `words`."""
    return [line for line in text.splitlines() if any(word in line for word in words)]


@pytest.mark.parametrize("run", ["smoke_run", "tofu_smoke_run"])
def test_executed_notebooks_carry_no_warnings(request, run):
    """No warning in any executed notebook of either profile: ours are fixed, and the libraries' notices
    a reader cannot act on (bitsandbytes' offline kernel fetch, its LLM.int8 cast) are filtered."""
    for name, path in request.getfixturevalue(run)["executed"].items():
        executed = json.loads(path.read_text())
        text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
        warned = lines_with(text, "Warning", "WARNING")
        assert not warned, (name, warned[:3])


@pytest.mark.parametrize("run", ["smoke_run", "tofu_smoke_run"])
def test_the_run_itself_prints_no_warning(request, run):
    """What `make reproduce` prints around the notebooks (the kernels' own output included) carries no
    warning or error either: in particular not ipykernel's "running over TCP without encryption", nor
    the "KeyboardInterrupt caught in kernel" that an interrupt before a kernel's shutdown can cause."""
    log = request.getfixturevalue(run)["log"].read_text()
    warned = lines_with(log, "Warning", "WARNING", "ERROR")  # splitlines splits at tqdm's \r too
    assert not warned, warned[:3]
    assert "without encryption" not in log
