"""probunlearn.comparison (notebook 04's computations) on the tiny random Llama of tests/tiny_lm.py and on
synthetic cells: one point of the dynamics, the per-question cells of each reading, the headline table
and the paired verdicts."""

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from tiny_lm import tiny_model, tiny_tokenizer

from probunlearn import bounds
from probunlearn.comparison import (best_above_bar, continue_runs, firing_curve, leakage_point, method_verdicts,
                                    mixing_lambdas, reading_cells, run_to_bar, variant_name, variant_table, verdict_table)
from probunlearn.stats import holm
from probunlearn.objectives import entropy_regulariser
from probunlearn.unlearning import adapter_state, unlearn
from tiny_unlearning import FORGET, RETAIN, fresh
from probunlearn.probabilistic import evaluate_model
from probunlearn.sampling import greedy_answers
from probunlearn.temperature import evaluate_adaptive

pytestmark = pytest.mark.usefixtures("one_thread")

RECORDS = [{"question": q, "answer": "the answer is here", "keywords": ["e"]}
           for q in ("hi", "what is the name of the author?", "where?")]


@pytest.fixture(scope="module")
def lm():
    return tiny_model(), tiny_tokenizer()


def test_leakage_point_is_the_greedy_and_sampled_evaluation_in_one_pass(lm):
    model, tokenizer = lm
    forget, retain = Dataset.from_list(RECORDS[:2]), Dataset.from_list(RECORDS[1:])
    point = leakage_point(model, tokenizer, forget, retain, num_samples=6, max_new_tokens=8, seed=2)
    table, raw = evaluate_model(model, tokenizer, {"f": forget}, num_samples=6, max_new_tokens=8, seed=2,
                                progress=False)["f"]
    assert point["forget_rouge_l_recall"] == pytest.approx(table["greedy_rouge_l"].mean())
    assert point["forget_m_bin"] == pytest.approx(float(np.mean(bounds.binary_leak_upper(raw["leaks"], bounds.ALPHA))))
    assert point["forget_leak_rate"] == pytest.approx(raw["leaks"].mean())
    assert point["forget_m_bin_questions"] == pytest.approx(list(bounds.binary_leak_upper(raw["leaks"], bounds.ALPHA)))
    from probunlearn.metrics import rouge_l_recall
    retain_greedy = greedy_answers(model, tokenizer, retain["question"], max_new_tokens=8, progress=False)
    assert point["retain_rouge_l_recall"] == pytest.approx(np.mean([rouge_l_recall(g, r["answer"])
                                                                    for g, r in zip(retain_greedy, retain)]))


def test_reading_cells_have_every_mode_split_and_question(lm):
    model, tokenizer = lm
    splits = {"forget": Dataset.from_list(RECORDS[:2]), "retain": Dataset.from_list(RECORDS[1:])}
    evaluated = evaluate_adaptive(model, tokenizer, splits, quantile=0.3, confidence_threshold=0.3, num_samples=4,
                                  max_new_tokens=8, progress=False)
    cells = reading_cells(evaluated)
    assert sorted(set(cells["mode"])) == ["confidence", "entropy", "plain"]
    assert len(cells) == 3 * (2 + 2)
    assert (cells.loc[cells["mode"] == "plain", "fire_rate"] == 0).all()
    confidence = cells[(cells["mode"] == "confidence") & (cells["split"] == "forget")]
    assert (confidence["fire_rate"] == evaluated["fire_rate"]["confidence"]["forget"]).all()
    assert (confidence["threshold"] == 0.3).all()
    assert [variant_name(e, m) for e in (False, True) for m in ("plain", "entropy")] == [
        "baseline", "+ AT (entropy)", "+ entropy", "+ entropy + AT (entropy)"]


def _synthetic_cells():
    rng = np.random.default_rng(0)
    rows = []
    for seed in (0, 1, 2):
        for question in range(8):
            base = rng.uniform(0.4, 0.9)
            for variant, shift in (("baseline", 0.0), ("+ entropy", -0.3), ("+ AT (entropy)", 0.0)):
                for split in ("forget", "retain"):
                    rows.append({"condition": "matched utility", "method": "ga", "variant": variant, "seed": seed,
                                 "question": question, "split": split, "m_bin": base + shift, "greedy_rouge_l": 0.5,
                                 "distinct_2": 0.2, "fire_rate": 0.0})
    return pd.DataFrame(rows)


def test_variant_table_and_verdicts_on_known_cells():
    cells = _synthetic_cells()
    table = variant_table(cells, metrics=("m_bin", "greedy_rouge_l", "distinct_2", "fire_rate"))
    assert len(table) == 3 and set(table["seeds"]) == {3}
    row = table.set_index("variant").loc["+ entropy"]
    forget = cells[(cells["variant"] == "+ entropy") & (cells["split"] == "forget")]
    assert row["forget_m_bin"] == pytest.approx(forget["m_bin"].mean())
    assert row["forget_m_bin_low"] < row["forget_m_bin"] < row["forget_m_bin_high"]
    assert "retain_distinct_2" in table.columns
    verdicts = verdict_table(cells).set_index("variant")
    assert verdicts.loc["+ entropy", "verdict"] == "lower"
    assert verdicts.loc["+ entropy", "mean_difference"] == pytest.approx(-0.3)
    assert verdicts.loc["+ AT (entropy)", "verdict"] == "changed no sample"  # the same cells: not a test
    assert np.isnan(verdicts.loc["+ AT (entropy)", "p_value_holm"]) and verdicts.loc["+ entropy", "p_value_holm"] < 0.05
    assert (verdicts["groups"] == 3).all()
    assert (verdicts["cells"] == 24).all()


def test_method_verdicts_pair_each_method_with_the_baseline_on_the_same_cells():
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(3):
        for question in range(10):
            base = rng.uniform(0.4, 0.9)
            for variant, shift in (("uncontrolled", {"ga": 0.0, "better": -0.3, "same": 0.0}),
                                   ("mixed", {"ga": 0.0, "better": 0.0, "same": 0.0})):
                for method, delta in shift.items():
                    noise = 0.0 if method == "ga" else rng.normal(0, 0.01)
                    rows.append({"seed": seed, "method": method, "variant": variant, "split": "forget",
                                 "question": question, "rouge_l_recall": base + delta + noise})
            rows.append({"seed": seed, "method": "better", "variant": "mixed", "split": "retain", "question": question,
                         "rouge_l_recall": 0.0})  # retain cells are not part of the comparison
    cells = pd.DataFrame(rows).sample(frac=1, random_state=1)  # pairing must not rely on row order
    table = method_verdicts(cells, metric="rouge_l_recall").set_index(["variant", "method"])
    assert len(table) == 4 and (table["cells"] == 30).all() and (table["seeds"] == 3).all()
    assert table.loc[("uncontrolled", "better"), "verdict"] == "lower"
    assert table.loc[("uncontrolled", "better"), "mean_difference"] == pytest.approx(-0.3, abs=0.01)
    assert table.loc[("mixed", "better"), "verdict"] == "inconclusive"  # the gap is gone at matched utility
    with pytest.raises(ValueError, match="baseline"):
        method_verdicts(cells, baseline="npo", metric="rouge_l_recall")


def test_mixing_lambdas_follow_the_model_behind_each_variant_not_its_name():
    rows = [{"condition": "matched utility", "method": "ga", "variant": variant, "seed": seed, "question": q,
             "mixing_lambda": lam[seed], "split": "forget", "m_bin": 0.5}
            for variant, lam in (("baseline", {0: 0.5, 1: 1.0}), ("+ AT (entropy)", {0: 0.5, 1: 1.0}),
                                 ("+ entropy", {0: 0.25, 1: 0.75}))
            for seed in (1, 0) for q in range(2)]
    table = mixing_lambdas(pd.DataFrame(rows)).set_index("variant")["mixing_lambdas"]
    assert table["+ AT (entropy)"] == [0.5, 1.0]  # a reading of adaptive temperature on the baseline model
    assert table["+ entropy"] == [0.25, 0.75]     # seed order, whatever the row order


def _family_cells():
    """Two methods, five variants: '+ entropy' lower on ga; '+ AT (confidence)' a little noise;
    '+ entropy + AT (entropy)' a copy of '+ entropy'; on 'floored' no baseline sample leaks."""
    rng = np.random.default_rng(3)
    rows = []
    for method in ("ga", "floored"):
        for seed in (0, 1, 2):
            for question in range(6):
                base = rng.uniform(0.4, 0.9) if method == "ga" else 0.134
                noise = rng.normal(0, 0.02)
                for variant, value in (("baseline", base), ("+ AT (entropy)", base), ("+ AT (confidence)", base + noise),
                                       ("+ entropy", base - 0.3), ("+ entropy + AT (entropy)", base - 0.3)):
                    rows.append({"condition": "best point", "method": method, "variant": variant, "seed": seed,
                                 "question": question, "split": "forget", "m_bin": value,
                                 "leak_rate": 0.0 if method == "floored" and variant == "baseline" else 0.2})
    return pd.DataFrame(rows)


def test_verdict_table_is_an_honest_family():
    verdicts = verdict_table(_family_cells())
    dropped = {(d["method"], d["variant"]): d["duplicate_of"] for d in verdicts.attrs["dropped"]}
    assert dropped == {("ga", "+ entropy + AT (entropy)"): "+ entropy", ("floored", "+ entropy + AT (entropy)"): "+ entropy"}
    table = verdicts.set_index(["method", "variant"])
    assert len(table) == 6 and ("ga", "+ entropy + AT (entropy)") not in table.index
    assert table.loc[("ga", "+ AT (entropy)"), "verdict"] == "changed no sample"
    assert table.loc[("floored", "+ AT (entropy)"), "verdict"] == "changed no sample"
    for variant in ("+ AT (confidence)", "+ entropy"):  # the baseline never leaked: no reduction can show
        assert table.loc[("floored", variant), "verdict"] == "cannot show a reduction at this n"
    assert table.loc[("ga", "+ entropy"), "verdict"] == "lower"
    tested = table[table["p_value_holm"].notna()]
    assert list(tested.index) == [("ga", "+ AT (confidence)"), ("ga", "+ entropy")]  # Holm over the tests only
    assert np.allclose(tested["p_value_holm"], holm(tested["p_value"].to_numpy()))


def test_firing_curve_counts_the_steps_below_each_threshold():
    entropies = {"forget": np.array([0.001, 0.01, 0.1, 1.0]), "retain": np.array([0.5, 1.0, 2.0, 3.0, 4.0])}
    curve = firing_curve(entropies, [0.005, 0.2, 1.5]).set_index("threshold")
    assert curve["fires_forget"].tolist() == [0.25, 0.75, 1.0]
    assert curve["fires_retain"].tolist() == [0.0, 0.0, 0.4]
    assert curve["retain_quantile"].tolist() == curve["fires_retain"].tolist()


def test_run_to_bar_stops_below_the_bar_and_keeps_its_best_point(tiny):
    model, tokenizer = fresh(tiny)
    scripted = iter([(1.0, 0.9), (0.95, 0.6), (0.92, 0.4), (0.91, 0.5), (0.5, 0.1), (0.4, 0.0), (0.3, 0.0)])
    snapshots = []

    def evaluate(m):  # a scripted trace: above the bar (0.9) for four evaluations, then below
        retain, m_bin = next(scripted)
        snapshots.append(adapter_state(m))
        return {"retain_rouge_l_recall": retain, "forget_m_bin": m_bin}

    run, best = run_to_bar(model, tokenizer, FORGET, RETAIN, bar=0.9, evaluate=evaluate, method="ga", steps=20,
                           learning_rate=1e-2, batch_size=2, eval_every=2, progress=False)
    assert [r["step"] for r in run.trace] == [0, 2, 4, 6, 8, 10] and run.stopped_at == 10 and len(run.log) == 10
    assert best["step"] == 4 and best["row"]["forget_m_bin"] == 0.4  # the lowest M_bin above the bar
    assert all(torch.equal(best["state"][k], v) for k, v in snapshots[2].items())
    assert not all(torch.equal(best["state"][k], v) for k, v in adapter_state(model).items())
    assert best_above_bar(pd.DataFrame(run.trace), 0.9)["step"] == 4
    with pytest.raises(TypeError, match="stop_when"):
        run_to_bar(model, tokenizer, FORGET, RETAIN, bar=0.9, evaluate=evaluate, stop_when=None, method="ga", steps=1,
                   learning_rate=1e-2, batch_size=2)


def test_run_to_bar_takes_the_first_row_it_is_given_and_may_keep_the_start(tiny):
    model, tokenizer = fresh(tiny)
    start = adapter_state(model)
    calls = []

    def evaluate(m):  # every evaluation after the start falls below the bar
        calls.append(1)
        return {"retain_rouge_l_recall": 0.5, "forget_m_bin": 0.0}

    given = {"retain_rouge_l_recall": 1.0, "forget_m_bin": 0.8}
    run, best = run_to_bar(model, tokenizer, FORGET, RETAIN, bar=0.9, evaluate=evaluate, initial_evaluation=given,
                           method="ga", steps=6, learning_rate=1e-2, batch_size=2, eval_every=2, progress=False)
    assert [r["step"] for r in run.trace] == [0, 2, 4] and len(calls) == 2  # step 0 read, not evaluated
    assert run.trace[0] == {"step": 0, **given} and given == {"retain_rouge_l_recall": 1.0, "forget_m_bin": 0.8}
    assert best["step"] == 0 and all(torch.equal(best["state"][k], v) for k, v in start.items())


def test_continue_runs_start_every_arm_at_one_state_and_pad_only_the_regularised_ones(tiny):
    model, tokenizer = fresh(tiny)
    common = dict(method="ga", learning_rate=1e-2, batch_size=2, seed=3, progress=False)
    unlearn(model, tokenizer, FORGET, RETAIN, steps=2, keep_checkpoints=False, **common)  # phase one
    start = adapter_state(model)
    widths = []

    def width(out):  # records the width of each step's forget batch, adds nothing to the loss
        widths.append(out.batches["forget"]["input_ids"].shape[1])
        return {}
    width.uses, width.parts = ("forget",), True

    arms = {"plain": [], "+ entropy": [entropy_regulariser(1.0, -0.25, "all")], "padded": [width]}
    ended = continue_runs(model, tokenizer, FORGET, RETAIN, start, arms, evaluate=adapter_state, steps=3, pad_to=64,
                          **common)
    assert list(ended) == list(arms) and all(len(e["log"]) == 3 and e["seconds"] > 0 for e in ended.values())
    assert widths == [64, 64, 64]  # a regularised arm runs padded; the plain one does not need to
    assert all(torch.equal(v, start[k]) for k, v in adapter_state(model).items())  # the model holds the start again
    # the control is the plain objective continued from the start, over the same batches
    unlearn(model, tokenizer, FORGET, RETAIN, steps=3, keep_checkpoints=False, **common)
    assert all(torch.allclose(v, ended["plain"]["result"][k]) for k, v in adapter_state(model).items())
    assert not all(torch.allclose(v, ended["+ entropy"]["result"][k]) for k, v in ended["plain"]["result"].items())
    # the padded arm adds nothing to the loss: it ends where the control does (padding changes no answer-token mean)
    assert all(torch.allclose(v, ended["padded"]["result"][k], atol=1e-5) for k, v in ended["plain"]["result"].items())
    with pytest.raises(TypeError, match="regularisers"):
        continue_runs(model, tokenizer, FORGET, RETAIN, start, arms, evaluate=adapter_state, steps=1, regularisers=[],
                      **common)


def test_continue_runs_an_arm_may_drop_the_objective_and_keep_the_entropy_term_alone(tiny):
    model, tokenizer = fresh(tiny)
    common = dict(method="ga", learning_rate=1e-2, batch_size=2, seed=3, progress=False)
    unlearn(model, tokenizer, FORGET, RETAIN, steps=2, keep_checkpoints=False, **common)
    start = adapter_state(model)
    term = entropy_regulariser(1.0, -0.25, "all")
    arms = {"continued": [], "+ entropy": [term], "entropy only": {"regularisers": [term], "method": "none"}}
    ended = continue_runs(model, tokenizer, FORGET, RETAIN, start, arms, evaluate=adapter_state, steps=2, pad_to=64,
                          **common)
    alone, added = ended["entropy only"]["log"], ended["+ entropy"]["log"]
    assert all("forget" not in row and {"entropy_forget", "entropy_retain"} <= set(row) for row in alone)
    assert all({"forget", "entropy_forget"} <= set(row) for row in added)
    assert alone[0]["loss"] == pytest.approx(alone[0]["entropy_forget"] + alone[0]["entropy_retain"])
    # the term alone moves the weights, and elsewhere than the objective with it
    moved = ended["entropy only"]["result"]
    assert not all(torch.allclose(v, start[k]) for k, v in moved.items())
    assert not all(torch.allclose(v, ended["+ entropy"]["result"][k]) for k, v in moved.items())
    assert all(torch.equal(v, start[k]) for k, v in adapter_state(model).items())
    with pytest.raises(ValueError, match="unknown keys"):
        continue_runs(model, tokenizer, FORGET, RETAIN, start, {"x": {"regularisers": [], "lr": 1}},
                      evaluate=adapter_state, steps=1, **common)
    with pytest.raises(ValueError, match="no loss of its own"):
        unlearn(model, tokenizer, FORGET, RETAIN, steps=1, method="none", learning_rate=1e-2, batch_size=2, progress=False)
