"""Evaluation of a model by its greedy answers and its likelihoods, in one place (notebooks 02-04 and
06; the sampled, probabilistic evaluation is `probabilistic`'s):

- greedy answers on the forget, retain and utility sets: ROUGE-L recall and keyword hit, and
  multiple-choice accuracy on the utility set (the true answer more likely than every wrong one,
  length-normalised as TOFU), `evaluate_greedy`;
- the metrics traced while a model unlearns (`trace_metrics`, `metric_scorer`) and the final
  evaluation of an unlearned model with TOFU's Forget Quality and Model Utility
  (`evaluate_unlearning`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from probunlearn.likelihood import answer_nll, answer_token_stats, token_summaries
from probunlearn.metrics import keyword_hit, rouge_l_recall
from probunlearn.sampling import greedy_answers
from probunlearn.tofu import forget_quality, model_utility, split_scores, truth_ratio, truth_ratio_score


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


def evaluate_greedy(model, tokenizer, splits: dict, *, max_new_tokens: int = 48, batch_size: int = 32,
                   utility_split: str = "utility", max_questions: int | None = None,
                   utility_max_questions: int | None = None) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Greedy scores on every split but the utility split, and multiple-choice accuracy on the utility
    split (a likelihood comparison: cheap, and what a 135M model can be judged on). `max_questions`
    caps the greedy splits, `utility_max_questions` the utility split (the first ones; None: all).
    Each greedy split is decoded in a pass of its own. Returns `(summary, per_question_tables)`;
    summary keys look like `forget_rouge_l_recall`, `utility_accuracy`."""
    summary, tables = {}, {}
    for name, dataset in splits.items():
        if name == utility_split:
            continue
        table = greedy_scores(model, tokenizer, cap(dataset, max_questions), max_new_tokens=max_new_tokens,
                              batch_size=batch_size)
        tables[name] = table
        summary |= split_summary(name, table)
    if utility_split in splits:
        summary[f"{utility_split}_accuracy"] = choice_accuracy(model, tokenizer, cap(splits[utility_split], utility_max_questions),
                                                               batch_size=batch_size)
    return summary, tables


# ----------------------------------------------------------------------------- evaluation
# Greedy answers and likelihoods of all splits go through the model together (fewer, fuller
# batches: on a CPU a decoding step costs about the same for 4 questions as for 32).


def greedy_tables(model, tokenizer, splits: Mapping, *, max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """`greedy_scores` of several splits with one decoding pass over all their
    questions: {split: table with question, answer, generated, rouge_l_recall, keyword_hit}."""
    questions = [q for dataset in splits.values() for q in dataset["question"]]
    generated = iter(greedy_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, progress=False))
    return {name: score_answers(dataset, [next(generated) for _ in range(len(dataset))])
            for name, dataset in splits.items()}


def nll_tables(model, tokenizer, splits: Mapping, *, fields: Sequence[str] = ("answer",),
               batch_size: int = 32, real_world: Sequence[str] = ("utility",)) -> dict:
    """Answer NLLs (`likelihood.answer_nll`) of several splits in one pass. `fields`: any of
    `answer`, `paraphrased` (not for the `real_world` splits, whose paraphrase is the answer,
    SPEC §4), `perturbed`. Returns {split: {"answer_nll": array, "paraphrased_nll": array,
    "perturbed_nll": [array per question]}}."""
    questions, answers, keys = [], [], []
    for name, dataset in splits.items():
        for i, record in enumerate(dataset):
            items = []
            if "answer" in fields:
                items.append(("answer", record["answer"]))
            if "paraphrased" in fields and name not in real_world:
                items.append(("paraphrased", record["paraphrased_answer"]))
            if "perturbed" in fields:
                items += [("perturbed", a) for a in record["perturbed_answer"]]
            for kind, answer in items:
                questions.append(record["question"])
                answers.append(answer)
                keys.append((name, kind, i))
    nll = answer_nll(model, tokenizer, questions, answers, batch_size=batch_size)
    out = {name: {"perturbed_nll": [[] for _ in range(len(dataset))]} for name, dataset in splits.items()}
    for (name, kind, i), value in zip(keys, nll):
        if kind == "perturbed":
            out[name]["perturbed_nll"][i].append(value)
        else:
            out[name].setdefault(f"{kind}_nll", []).append(value)
    for name, table in out.items():
        for key, values in table.items():
            table[key] = [np.asarray(v) for v in values] if key == "perturbed_nll" else np.asarray(values)
        if "perturbed" not in fields:
            del table["perturbed_nll"]
    return out


PER_QUESTION = "_per_question"  # suffix of the per-question lists in a trace row


def trunk_answer_nll(model, tokenizer, questions, answers, trunk, *, batch_size: int = 32) -> np.ndarray:
    """`likelihood.answer_nll` through a `answers.FrozenTrunk`: the blocks below the adapter run once
    per sequence for every model that shares them (each evaluation of an unlearning run, each
    mixing weight), and the output head runs on answer positions only. The same numbers up to
    float rounding (the tests compare them)."""
    stats = answer_token_stats(model, tokenizer, questions, answers, batch_size=batch_size, trunk=trunk)
    return token_summaries(stats)["nll"]


# the likelihood numbers of a trace row, per split: all from one teacher-forced pass
LIKELIHOOD_METRICS = ("nll", "extraction_strength", "exact_memorization")


def likelihood_metrics(model, tokenizer, dataset, *, batch_size: int = 32, trunk=None) -> dict[str, np.ndarray]:
    """Per question of `dataset`: answer NLL, Extraction Strength and Exact Memorization
    (`likelihood.extraction_strength`, `likelihood.exact_memorization`), from one teacher-forced pass
    (`likelihood.answer_token_stats`, through `trunk` when given)."""
    stats = answer_token_stats(model, tokenizer, dataset["question"], dataset["answer"], batch_size=batch_size,
                               trunk=trunk if trunk is not None and trunk.enabled else None)
    return token_summaries(stats)


def trace_metrics(model, tokenizer, eval_sets: Mapping, *, max_new_tokens: int = 48, batch_size: int = 32,
                  nll: bool = True, per_question: bool = False, trunk=None, greedy: bool = True) -> dict:
    """The numbers tracked during unlearning, per split of `eval_sets` (e.g. forget, retain):
    `<split>_rouge_l_recall` and `<split>_keyword_hit` of greedy answers, and (`nll=True`) the
    teacher-forced `<split>_nll` (mean answer NLL), `<split>_extraction_strength` ([P2] v2) and
    `<split>_exact_memorization` (`likelihood_metrics`). `per_question=True` adds the lists behind
    the means, `<split>_<metric>_per_question`, for statistics over (seed, question) cells
    (`control.variant_cells`). `trunk`: a `answers.FrozenTrunk` of this model, for the
    teacher-forced numbers (the frozen blocks run once per sequence, not once per evaluation).
    `greedy=False` skips the decoding (a bar metric that needs only likelihoods)."""
    row = {}
    if greedy:
        for name, table in greedy_tables(model, tokenizer, eval_sets, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size).items():
            row |= split_summary(name, table)
            if per_question:
                row[f"{name}_rouge_l_recall{PER_QUESTION}"] = table["rouge_l_recall"].round(6).tolist()
                row[f"{name}_keyword_hit{PER_QUESTION}"] = table["keyword_hit"].tolist()
    if nll:
        for name, dataset in eval_sets.items():
            for metric, values in likelihood_metrics(model, tokenizer, dataset, batch_size=batch_size,
                                                     trunk=trunk).items():
                row[f"{name}_{metric}"] = float(values.mean())
                if per_question and metric != "nll":
                    row[f"{name}_{metric}{PER_QUESTION}"] = values.round(6).tolist()
    return row


def metric_scorer(tokenizer, eval_sets: Mapping, metric: str, *, max_new_tokens: int = 48,
                  batch_size: int = 32, trunk=None) -> Callable:
    """`score(model) -> float`: one `trace_metrics` number (e.g. the bar metric
    `retain_rouge_l_recall`, or [P2] v2's `retain_extraction_strength`), computing only the split
    it needs, and no decoding for a teacher-forced metric (`LIKELIHOOD_METRICS`; `trunk` serves
    those). Used by `choose_mixing`."""
    split = next((name for name in eval_sets if metric.startswith(f"{name}_")), None)
    if split is None:
        raise ValueError(f"metric {metric!r} names none of the splits {', '.join(eval_sets)}; "
                         f"use e.g. 'retain_rouge_l_recall'")

    likelihood = metric.endswith(tuple(f"_{m}" for m in LIKELIHOOD_METRICS))

    def score(model) -> float:
        row = trace_metrics(model, tokenizer, {split: eval_sets[split]}, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, nll=likelihood, greedy=not likelihood, trunk=trunk)
        if metric not in row:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(row)}")
        return row[metric]

    return score


def forget_truth_ratios(model, tokenizer, forget_set, *, batch_size: int = 32) -> np.ndarray:
    """Truth ratios R of `model` on the forget set (SPEC §4), the input of Forget Quality. Pass every
    forget question (SPEC §4: Forget Quality uses all of them; a KS p-value on 8 questions takes only
    a handful of values)."""
    table = nll_tables(model, tokenizer, {"forget": forget_set}, fields=("paraphrased", "perturbed"),
                       batch_size=batch_size)["forget"]
    return truth_ratio(table["paraphrased_nll"], table["perturbed_nll"])


def evaluate_unlearning(model, tokenizer, splits: Mapping, *, retain_truth_ratios, max_new_tokens: int = 48,
                        batch_size: int = 32, forget_quality_set=None) -> dict:
    """One row of the comparison table (SPEC §4) for a model, from `splits` with `forget`,
    `retain` and `utility`:

    - greedy `forget_/retain_/utility_rouge_l_recall` and `_keyword_hit`;
    - `utility_accuracy`: the true answer more likely than each wrong one (`evaluation.choice_accuracy`);
    - `forget_/retain_extraction_strength` and `_exact_memorization` (`likelihood_metrics`);
    - `forget_truth_ratio` (mean min(R, 1/R)) and `forget_quality`: KS p-value against
      `retain_truth_ratios` (the retain model's truth ratios on the same forget questions,
      `forget_truth_ratios`), both on `forget_quality_set` when given (SPEC §4: every forget
      question; its likelihoods go through the model in the same pass), else on `splits["forget"]`;
      `forget_quality_questions`: how many questions they use;
    - `model_utility`: harmonic mean of Prob, ROUGE-L and truth-ratio score on retain and on the
      utility set (our real-world set: normalised Prob, the true answer as paraphrase), plus the
      six components as `mu_<split>_<metric>`.

    Every question of each split is answered greedily and scored on 5 (4 on utility) answers:
    cap the splits (`evaluation.cap`) to fit a CPU budget; `forget_quality_set` is only scored.
    """
    splits = {name: splits[name] for name in ("forget", "retain", "utility")}
    row = {}
    scored = splits if forget_quality_set is None else {**splits, "forget_quality": forget_quality_set}
    data = nll_tables(model, tokenizer, scored, fields=("answer", "paraphrased", "perturbed"), batch_size=batch_size)
    for name, table in greedy_tables(model, tokenizer, splits, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size).items():
        row |= split_summary(name, table)
        data[name]["rouge_l"] = table["rouge_l_recall"].to_numpy()
    utility = data["utility"]
    row["utility_accuracy"] = float(np.mean([true < wrong.min() for true, wrong
                                             in zip(utility["answer_nll"], utility["perturbed_nll"])]))
    quality = data["forget" if forget_quality_set is None else "forget_quality"]
    ratios = truth_ratio(quality["paraphrased_nll"], quality["perturbed_nll"])
    if len(ratios) != len(retain_truth_ratios):
        raise ValueError(f"{len(ratios)} forget questions scored for Forget Quality but {len(retain_truth_ratios)} "
                         "retain-model truth ratios: compute them with forget_truth_ratios on the same forget "
                         "questions (pass that set as forget_quality_set)")
    row["forget_truth_ratio"] = truth_ratio_score(ratios, "forget")
    row["forget_quality"] = forget_quality(ratios, retain_truth_ratios)
    row["forget_quality_questions"] = len(ratios)
    row["forget_nll"] = float(np.mean(data["forget"]["answer_nll"]))
    row["retain_nll"] = float(np.mean(data["retain"]["answer_nll"]))
    for name in ("forget", "retain"):
        for metric, values in likelihood_metrics(model, tokenizer, splits[name], batch_size=batch_size).items():
            if metric != "nll":
                row[f"{name}_{metric}"] = float(values.mean())
    components = {f"mu_retain_{k}": v for k, v in split_scores("retain", data["retain"]).items()}
    # our utility set plays TOFU's real-world role (world facts): normalised Prob, answer as paraphrase
    components |= {f"mu_utility_{k}": v for k, v in split_scores("world_facts", utility).items()}
    row["model_utility"] = model_utility(components)
    return {**row, **components}


# ----------------------------------------------------------------------------- distance to the retain model
# SPEC §4, "Reading forget scores": the ideal unlearned model is the retain model, which never saw the
# forget facts and still scores above zero on template-shared metrics (ROUGE-L ≈ 0.6 on generated
# data). A forget score is read against the retain model's, question by question; below it is damage.


def question_cells(evaluation: Mapping, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (split, question) of a trace row with per-question lists (`trace_metrics(...,
    per_question=True)`): columns `split`, `question` and `metrics`. The cells of one model, e.g. the
    retain model's for `retain_distance`; `control.variant_cells` adds seed, method and variant."""
    splits = sorted({k.split("_")[0] for k in evaluation if k.endswith(PER_QUESTION)})
    if not splits:
        raise ValueError("the evaluation has no per-question lists: compute it with trace_metrics(..., per_question=True)")
    frames = []
    for split in splits:
        missing = [m for m in metrics if f"{split}_{m}{PER_QUESTION}" not in evaluation]
        if missing:
            raise KeyError(f"the evaluation has no per-question {', '.join(missing)} on {split}; "
                           f"trace_metrics(..., nll=True, per_question=True) gives all of them")
        values = {m: evaluation[f"{split}_{m}{PER_QUESTION}"] for m in metrics}
        frames.append(pd.DataFrame({"split": split, "question": range(len(values[metrics[0]])), **values}))
    return pd.concat(frames, ignore_index=True)


def retain_distance(cells: pd.DataFrame, retain, metrics: Sequence[str], *,
                    on: Sequence[str] = ("split", "question")) -> pd.DataFrame:
    """`cells` with, for each metric m, `m_vs_retain` (the value minus the retain model's on the same
    cell: below 0 is damage, not forgetting) and `m_distance` (its absolute value: 0 = what a model that
    never saw the forget facts scores). `retain`: the retain model's cells (a DataFrame with the `on`
    columns and `metrics`, e.g. `question_cells` of its trace row), or one value per metric (a mapping,
    e.g. its MIA AUC; `on` is then ignored). Every cell must have a retain value."""
    out = cells.copy()
    if isinstance(retain, Mapping):
        reference = pd.DataFrame({m: [float(retain[m])] * len(out) for m in metrics}, index=out.index)
    else:
        if retain.duplicated(list(on)).any():
            raise ValueError(f"the retain model's cells repeat some {tuple(on)}: pass one row per cell")
        keys = pd.MultiIndex.from_frame(out[list(on)])
        reference = retain.set_index(list(on))[list(metrics)].reindex(keys)
        reference.index = out.index
        if reference.isna().any().any():
            absent = out.loc[reference.isna().any(axis=1), list(on)].drop_duplicates().head(3).to_dict("records")
            raise ValueError(f"the retain model has no value on some cells, e.g. {absent}: evaluate it on the same "
                             "questions (the same eval_sets)")
    for m in metrics:
        out[f"{m}_vs_retain"] = out[m] - reference[m]
        out[f"{m}_distance"] = out[f"{m}_vs_retain"].abs()
    return out


def summarise_splits(cells: pd.DataFrame, metrics: Sequence[str], *, by: Sequence[str] = ("method", "variant")):
    """`stats.summarise_cells` of a long table of cells (with `split` and `seed` columns) per group of
    `by`, one row per group with `<split>_<metric>`, `<split>_<metric>_low`, `<split>_<metric>_high`
    (means over (seed, question) cells and their 95 % intervals) and `seeds` (notebook 03's tables)."""
    from probunlearn.stats import summarise_cells

    summary = summarise_cells(cells, by=[*by, "split"], metrics=list(metrics))
    values = [f"{m}{suffix}" for m in metrics for suffix in ("", "_low", "_high")]
    wide = summary.pivot_table(index=list(by), columns="split", values=values, sort=False)
    wide.columns = [f"{split}_{metric}" for metric, split in wide.columns]
    order = [f"{split}_{v}" for split in summary["split"].unique() for v in values]
    seeds = summary.groupby(list(by), sort=False)["seeds"].max()
    return wide[order].join(seeds).reset_index()
