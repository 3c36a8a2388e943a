"""Greedy evaluation of a model on the forget, retain and utility sets (used by notebooks 02–04):
ROUGE-L recall and keyword hit rate of greedy answers, and multiple-choice accuracy on the
utility set (the true answer more likely than every wrong one, length-normalised as TOFU)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from probunlearn.metrics import answer_nll, keyword_hit, rouge_l_recall
from probunlearn.sampling import greedy_answers


def greedy_scores(model, tokenizer, dataset, *, max_new_tokens: int = 48, batch_size: int = 32) -> pd.DataFrame:
    """One row per question: the greedy answer, its ROUGE-L recall against the true answer and
    whether it contains the fact keyword."""
    generated = greedy_answers(model, tokenizer, dataset["question"], max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    return score_answers(dataset, generated)


def score_answers(dataset, generated) -> pd.DataFrame:
    """The `greedy_scores` table for answers already generated (one per record of `dataset`)."""
    return pd.DataFrame({
        "question": dataset["question"],
        "answer": dataset["answer"],
        "generated": generated,
        "rouge_l_recall": [rouge_l_recall(g, a) for g, a in zip(generated, dataset["answer"])],
        "keyword_hit": [keyword_hit(g, k) for g, k in zip(generated, dataset["keywords"])],
    })


def choice_accuracy(model, tokenizer, dataset, *, batch_size: int = 32) -> float:
    """Fraction of questions whose true answer has a lower average NLL than each perturbed answer."""
    questions, answers, owners = [], [], []
    for i, record in enumerate(dataset):
        for answer in [record["answer"], *record["perturbed_answer"]]:
            questions.append(record["question"])
            answers.append(answer)
            owners.append(i)
    nll = answer_nll(model, tokenizer, questions, answers, batch_size=batch_size)
    owners = np.asarray(owners)
    correct = [nll[owners == i][0] < nll[owners == i][1:].min() for i in range(len(dataset))]
    return float(np.mean(correct))


def split_summary(name: str, table: pd.DataFrame) -> dict[str, float]:
    """`<name>_rouge_l_recall` and `<name>_keyword_hit`: the means of a `greedy_scores` table."""
    return {f"{name}_rouge_l_recall": float(table["rouge_l_recall"].mean()),
            f"{name}_keyword_hit": float(table["keyword_hit"].mean())}


def cap(dataset, max_questions: int | None):
    """The first `max_questions` records (all when None): evaluation subsets that fit a CPU budget."""
    return dataset if max_questions is None or len(dataset) <= max_questions else dataset.select(range(max_questions))


def evaluate_model(model, tokenizer, splits: dict, *, max_new_tokens: int = 48, batch_size: int = 32,
                   utility_split: str = "utility", max_questions: int | None = None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Greedy scores on every split but the utility split, and multiple-choice accuracy on the utility
    split (a likelihood comparison: cheap, and what a 135M model can be judged on). `max_questions`
    caps the greedy splits. Returns `(summary, per_question_tables)`; summary keys look like
    `forget_rouge_l_recall`, `utility_accuracy`."""
    summary, tables = {}, {}
    for name, dataset in splits.items():
        if name == utility_split:
            continue
        table = greedy_scores(model, tokenizer, cap(dataset, max_questions), max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
        tables[name] = table
        summary |= split_summary(name, table)
    if utility_split in splits:
        summary[f"{utility_split}_accuracy"] = choice_accuracy(model, tokenizer, splits[utility_split], batch_size=batch_size)
    return summary, tables
