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
