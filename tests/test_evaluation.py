"""Evaluation of unlearned models: traced metrics through the frozen trunk, batched likelihood tables and
the TOFU-style row."""

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset

from probunlearn.evaluation import evaluate_unlearning, forget_truth_ratios, nll_tables
from probunlearn.likelihood import answer_nll
from probunlearn.models import add_lora
from tiny_unlearning import FORGET, RETAIN, fresh, perturb_adapter


def test_trunk_answer_nll_equals_answer_nll_and_trace_metrics_uses_it(tiny):
    from probunlearn.answers import FrozenTrunk
    from probunlearn.evaluation import trace_metrics, trunk_answer_nll

    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(tiny["model"]), r=4, lora_alpha=8, top_layers=1)
    tokenizer = tiny["tokenizer"]
    perturb_adapter(model)
    trunk = FrozenTrunk(model)
    records = FORGET + RETAIN
    questions, answers = [r["question"] for r in records], [r["answer"] for r in records]
    plain = answer_nll(model, tokenizer, questions, answers)
    fast = trunk_answer_nll(model, tokenizer, questions, answers, trunk, batch_size=3)
    np.testing.assert_allclose(fast, plain, rtol=1e-4)
    assert len(set(np.round(plain, 4))) > 1  # the numbers differ between items: the comparison means something
    splits = {"forget": Dataset.from_list(FORGET), "retain": Dataset.from_list(RETAIN)}
    with_trunk = trace_metrics(model, tokenizer, splits, max_new_tokens=4, trunk=trunk)
    without = trace_metrics(model, tokenizer, splits, max_new_tokens=4)
    assert with_trunk["forget_nll"] == pytest.approx(without["forget_nll"], rel=1e-4)
    assert with_trunk["retain_nll"] == pytest.approx(without["retain_nll"], rel=1e-4)


def test_evaluate_unlearning_gives_a_table_row(tiny):
    from datasets import Dataset

    model, tokenizer = fresh(tiny)
    splits = {"forget": Dataset.from_list(FORGET), "retain": Dataset.from_list(RETAIN[:3]),
              "utility": Dataset.from_list(RETAIN[3:6])}
    retain_ratios = forget_truth_ratios(model, tokenizer, splits["forget"])
    row = evaluate_unlearning(model, tokenizer, splits, retain_truth_ratios=retain_ratios, max_new_tokens=3)
    for key in ("forget_rouge_l_recall", "forget_keyword_hit", "retain_rouge_l_recall", "utility_accuracy",
                "forget_quality", "model_utility"):
        assert 0.0 <= row[key] <= 1.0
    assert row["forget_quality"] == 1.0  # the same model against itself: identical truth ratios


def test_evaluate_greedy_scores_each_split_alone_and_caps_the_utility_split(tiny):
    from probunlearn.evaluation import choice_accuracy, evaluate_greedy, greedy_scores

    model, tokenizer = fresh(tiny)
    perturb_adapter(model)
    splits = {"forget": Dataset.from_list(FORGET), "retain": Dataset.from_list(RETAIN[:5]),
              "utility": Dataset.from_list(RETAIN[3:6])}
    summary, tables = evaluate_greedy(model, tokenizer, splits, max_new_tokens=4, batch_size=3, max_questions=4,
                                      utility_max_questions=2)
    assert set(tables) == {"forget", "retain"} and len(tables["retain"]) == 4  # capped; utility is not decoded
    for name in tables:
        alone = greedy_scores(model, tokenizer, splits[name].select(range(len(tables[name]))), max_new_tokens=4, batch_size=3)
        assert list(tables[name]["generated"]) == list(alone["generated"])
        assert summary[f"{name}_rouge_l_recall"] == pytest.approx(alone["rouge_l_recall"].mean())
    assert summary["utility_accuracy"] == choice_accuracy(model, tokenizer, splits["utility"].select(range(2)))
    assert evaluate_greedy(model, tokenizer, {"utility": splits["utility"]}, max_new_tokens=4)[0] == {
        "utility_accuracy": choice_accuracy(model, tokenizer, splits["utility"])}


def test_batched_likelihoods_match_the_per_question_ones(tiny):
    from datasets import Dataset

    from probunlearn.evaluation import choice_accuracy

    model, tokenizer = fresh(tiny)
    splits = {"forget": Dataset.from_list(FORGET[:2]), "utility": Dataset.from_list(RETAIN[:3])}
    tables = nll_tables(model, tokenizer, splits, fields=("answer", "paraphrased", "perturbed"))
    record = RETAIN[2]
    alone = answer_nll(model, tokenizer, [record["question"]] * 4, [record["answer"], *record["perturbed_answer"]])
    assert tables["utility"]["answer_nll"][2] == pytest.approx(alone[0], rel=1e-4)
    assert tables["utility"]["perturbed_nll"][2] == pytest.approx(alone[1:], rel=1e-4)
    assert "paraphrased_nll" not in tables["utility"] and len(tables["forget"]["paraphrased_nll"]) == 2
    retain_ratios = forget_truth_ratios(model, tokenizer, splits["forget"])
    row = evaluate_unlearning(model, tokenizer, {**splits, "retain": splits["utility"]},
                              retain_truth_ratios=retain_ratios, max_new_tokens=2)
    assert row["utility_accuracy"] == choice_accuracy(model, tokenizer, splits["utility"])


def test_forget_quality_uses_the_forget_quality_set_and_says_how_many_questions(tiny):
    """SPEC §4: Forget Quality on every forget question, while the greedy numbers stay on the capped set."""
    model, tokenizer = fresh(tiny)
    other, _ = fresh(tiny, seed=3)
    perturb_adapter(other)
    every = Dataset.from_list(FORGET + RETAIN[:4])  # stands in for all forget questions
    splits = {"forget": Dataset.from_list(FORGET[:2]), "retain": Dataset.from_list(RETAIN[:2]),
              "utility": Dataset.from_list(RETAIN[2:4])}
    retain_ratios = forget_truth_ratios(model, tokenizer, every)
    row = evaluate_unlearning(model, tokenizer, splits, retain_truth_ratios=retain_ratios, max_new_tokens=2,
                              forget_quality_set=every)
    assert row["forget_quality_questions"] == len(every) and row["forget_quality"] == 1.0
    moved = evaluate_unlearning(other, tokenizer, splits, retain_truth_ratios=retain_ratios, max_new_tokens=2,
                                forget_quality_set=every)
    from probunlearn.tofu import forget_quality, truth_ratio_score

    ratios = forget_truth_ratios(other, tokenizer, every)
    assert moved["forget_quality"] == pytest.approx(forget_quality(ratios, retain_ratios))
    assert moved["forget_truth_ratio"] == pytest.approx(truth_ratio_score(ratios, "forget"))
    capped = evaluate_unlearning(other, tokenizer, splits, retain_truth_ratios=forget_truth_ratios(
        model, tokenizer, splits["forget"]), max_new_tokens=2)  # without it: the capped forget split, as before
    assert capped["forget_quality_questions"] == 2
    assert capped["forget_rouge_l_recall"] == moved["forget_rouge_l_recall"]  # greedy numbers: the same questions
    with pytest.raises(ValueError, match="forget_quality_set"):
        evaluate_unlearning(other, tokenizer, splits, retain_truth_ratios=retain_ratios, max_new_tokens=2)


def test_retain_distance_per_question_and_per_value():
    import pandas as pd

    from probunlearn.evaluation import question_cells, retain_distance

    retain_row = {"forget_rouge_l_recall_per_question": [0.6, 0.5], "retain_rouge_l_recall_per_question": [1.0, 0.8],
                  "forget_rouge_l_recall": 0.55}
    retain_cells = question_cells(retain_row, ["rouge_l_recall"])
    assert retain_cells.to_dict("list") == {"split": ["forget", "forget", "retain", "retain"], "question": [0, 1, 0, 1],
                                            "rouge_l_recall": [0.6, 0.5, 1.0, 0.8]}
    cells = pd.DataFrame({"seed": [0, 0, 1, 0], "split": ["forget", "forget", "forget", "retain"],
                          "question": [0, 1, 1, 1], "rouge_l_recall": [0.1, 0.75, 0.5, 0.8]})
    out = retain_distance(cells, retain_cells, ["rouge_l_recall"])
    assert out["rouge_l_recall_vs_retain"].tolist() == pytest.approx([-0.5, 0.25, 0.0, 0.0])  # below: damage
    assert out["rouge_l_recall_distance"].tolist() == pytest.approx([0.5, 0.25, 0.0, 0.0])
    assert out[cells.columns].equals(cells)  # the cells are kept as they were
    auc = retain_distance(pd.DataFrame({"mia_auc_loss": [0.3, 0.7]}), {"mia_auc_loss": 0.5}, ["mia_auc_loss"])
    assert auc["mia_auc_loss_distance"].tolist() == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError, match="same questions"):
        retain_distance(cells.assign(question=[0, 1, 1, 5]), retain_cells, ["rouge_l_recall"])
    with pytest.raises(ValueError, match="per_question=True"):
        question_cells({"forget_rouge_l_recall": 0.5}, ["rouge_l_recall"])


def test_summarise_splits_puts_each_split_beside_the_other():
    import pandas as pd

    from probunlearn.evaluation import summarise_splits

    cells = pd.DataFrame([{"seed": seed, "method": method, "variant": "mixed", "split": split, "question": q,
                           "rouge_l_recall": value + 0.1 * q}
                          for seed in (0, 1) for method, value in (("ga", 0.2), ("npo", 0.4))
                          for split in ("forget", "retain") for q in range(3)])
    wide = summarise_splits(cells, ["rouge_l_recall"])
    assert wide["method"].tolist() == ["ga", "npo"] and (wide["seeds"] == 2).all()
    assert wide["forget_rouge_l_recall"].tolist() == pytest.approx([0.3, 0.5])
    assert (wide["forget_rouge_l_recall_low"] <= wide["forget_rouge_l_recall"]).all()
    assert (wide["forget_rouge_l_recall"] <= wide["forget_rouge_l_recall_high"]).all()
    assert {"retain_rouge_l_recall", "retain_rouge_l_recall_low", "retain_rouge_l_recall_high"} <= set(wide.columns)
