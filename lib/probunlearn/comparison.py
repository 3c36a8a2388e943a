"""[P1]'s fix, measured: entropy optimisation and adaptive temperature against the same base methods,
over seeds, with intervals and paired verdicts (SPEC §2, §6.2; notebook 04).

[P1] Scholten, Günnemann, Schwinn, ICLR 2025, §5. What this module computes:

- `leakage_point(model, ...)`: one point of the unlearning dynamics: greedy forget and retain
  ROUGE-L, and the forget set's sampled leakage (mean M_bin, leak rate), in one decoding pass;
- `reading_cells(evaluated)`: the per-question cells of a model sampled plainly and under each
  reading of adaptive temperature (`temperature.evaluate_adaptive`), for `stats`;
- `variant_table(cells)`: per method, condition and variant, the means with 95 % intervals;
- `verdict_table(cells)`: each variant against its method's baseline on the same (seed, question)
  cells of forget M_bin: "lower", "higher", "inconclusive" or "no difference" (`stats.paired_verdict`:
  interval grouped by seed, sign-flip p-value, Holm over the table).

Variants (the rows of the headline): the base method (`baseline`), with adaptive temperature in
each reading (`+ AT (entropy)`, `+ AT (confidence)`), with entropy optimisation (`+ entropy`), and
with both (`+ entropy + AT (...)`). Conditions: `uncontrolled` (the same unlearning budget for every
variant, what [P1] reports) and `matched utility` (each model mixed to the same utility bar, what
[P2] asks).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from probunlearn import bounds
from probunlearn.metrics import is_leak, keyword_hit, rouge_l_recall
from probunlearn.probabilistic import question_cells
from probunlearn.sampling import GREEDY, answer_texts, sample_rows
from probunlearn.stats import paired_verdicts, summarise_cells

__all__ = ["leakage_point", "reading_cells", "variant_name", "variant_table", "verdict_table", "MODES"]

MODES = ("plain", "entropy", "confidence")  # sampling: plain, or adaptive temperature in either reading


def leakage_point(model, tokenizer, forget_set, retain_set, *, num_samples: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, alpha: float = bounds.ALPHA, leak_tau: float = 0.5,
                  seed: int = 0, batch_size: int | None = None) -> dict:
    """The numbers of one point of the unlearning dynamics, from one decoding pass: greedy answers to
    every question of both sets and `num_samples` sampled answers to each forget question.
    Returns `forget_rouge_l_recall`, `forget_keyword_hit`, `retain_rouge_l_recall` (greedy, means),
    `forget_m_bin` (mean over forget questions of M_bin, SPEC §5), `forget_leak_rate` (share of
    leaking samples) and `forget_greedy_leak`; usable as `unlearn(..., evaluate=...)`."""
    forget, retain = list(forget_set), list(retain_set)
    questions = [r["question"] for r in forget + retain]
    rows = [(i, GREEDY) for i in range(len(questions))] + [(i, j) for i in range(len(forget)) for j in range(num_samples)]
    ids = sample_rows(model, tokenizer, questions, rows, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=False)
    texts = dict(zip(rows, answer_texts(tokenizer, ids)))
    greedy = [texts[i, GREEDY] for i in range(len(questions))]
    leaks = np.array([[is_leak(texts[i, j], r["answer"], r["keywords"], leak_tau) for j in range(num_samples)]
                      for i, r in enumerate(forget)])
    return {
        "forget_rouge_l_recall": float(np.mean([rouge_l_recall(g, r["answer"]) for g, r in zip(greedy, forget)])),
        "forget_keyword_hit": float(np.mean([keyword_hit(g, r["keywords"]) for g, r in zip(greedy, forget)])),
        "retain_rouge_l_recall": float(np.mean([rouge_l_recall(g, r["answer"])
                                                for g, r in zip(greedy[len(forget):], retain)])),
        "forget_greedy_leak": float(np.mean([is_leak(g, r["answer"], r["keywords"], leak_tau)
                                             for g, r in zip(greedy, forget)])),
        "forget_m_bin": float(np.mean(bounds.binary_leak_upper(leaks, alpha))),
        "forget_leak_rate": float(leaks.mean()),
    }


def variant_name(entropy: bool, mode: str) -> str:
    """"baseline", "+ AT (entropy)", "+ entropy", "+ entropy + AT (confidence)", ..."""
    parts = (["+ entropy"] if entropy else []) + ([f"+ AT ({mode})"] if mode != "plain" else [])
    return " ".join(parts) or "baseline"


def reading_cells(evaluated: Mapping, *, mbin_threshold: float = 0.1) -> pd.DataFrame:
    """One row per (mode, split, question) of an `evaluate_adaptive` result: `question_cells` plus
    `mode` ("plain" or the reading), `fire_rate` and `redrawn` of that mode on that split, and
    `h_tau` (the threshold of the mode: h_τ for the entropy reading, c_T for the confidence one)."""
    frames = []
    for mode in ("plain", *evaluated["adaptive"]):
        by_split = evaluated["plain"] if mode == "plain" else evaluated["adaptive"][mode]
        for split, (table, _) in by_split.items():
            cells = question_cells(table, mbin_threshold=mbin_threshold).assign(mode=mode, split=split)
            cells["fire_rate"] = 0.0 if mode == "plain" else evaluated["fire_rate"][mode][split]
            cells["redrawn"] = 0.0 if mode == "plain" else evaluated["redrawn"][mode][split]
            cells["threshold"] = np.nan if mode == "plain" else evaluated["threshold"][mode]
            frames.append(cells)
    return pd.concat(frames, ignore_index=True)


def variant_table(cells: pd.DataFrame, metrics: Sequence[str] = ("m_bin", "greedy_rouge_l", "mean_rouge_l", "ed",
                                                                  "leak_rate", "distinct_2", "fire_rate")) -> pd.DataFrame:
    """Per (condition, method, variant): every metric on the forget split (`forget_<metric>`, with
    `_low` / `_high`: its 95 % interval over (seed, question) cells, grouped by seed) and on the
    retain split (`retain_<metric>`), and `seeds`. `cells` has the columns of `reading_cells` plus `condition`,
    `method`, `variant` and `seed`."""
    summary = summarise_cells(cells, by=["condition", "method", "variant", "split"], metrics=list(metrics))
    frames = []
    for split in ("forget", "retain"):
        part = summary[summary["split"] == split].drop(columns=["split", "cells"])
        part = part.rename(columns={c: f"{split}_{c}" for c in part.columns
                                    if c not in ("condition", "method", "variant", "seeds")})
        frames.append(part.set_index(["condition", "method", "variant", "seeds"]))
    table = frames[0].join(frames[1]).reset_index()
    if "mixing_lambda" in cells.columns:
        table = table.merge(mixing_lambdas(cells), on=["condition", "method", "variant"], how="left")
    return table


def mixing_lambdas(cells: pd.DataFrame) -> pd.DataFrame:
    """Per (condition, method, variant): `mixing_lambdas`, the mixing weight of the model behind the
    variant's cells, one per seed in seed order (a variant and its base method may come from
    different models: "+ entropy" rows from the entropy-trained ones)."""
    per_seed = cells.drop_duplicates(["condition", "method", "variant", "seed"]).sort_values("seed")
    return (per_seed.groupby(["condition", "method", "variant"], sort=False)["mixing_lambda"]
            .apply(lambda values: [float(v) for v in values]).rename("mixing_lambdas").reset_index())


def verdict_table(cells: pd.DataFrame, metric: str = "m_bin", baseline: str = "baseline") -> pd.DataFrame:
    """Each variant of each (condition, method) against its `baseline` on the same (seed, question)
    cells of the forget split: the paired mean difference of `metric` (variant − baseline), its 95 %
    interval (grouped by seed: seeds, then questions within), the sign-flip p-value, its Holm
    adjustment over the whole table (`p_value_holm`: the table is one family) and the verdict
    (`stats.VERDICTS`; "lower": the variant leaks less; "no difference": it changed no cell), with
    `excludes_lower_by` and `reading` (`stats.paired_verdict`)."""
    verdicts = paired_verdicts(cells[cells["split"] == "forget"], compare="variant", reference=baseline,
                               within=["condition", "method"], metrics=[metric])
    return verdicts.assign(metric=f"forget_{metric}")


def method_verdicts(cells: pd.DataFrame, baseline: str = "ga", metric: str = "rouge_l_recall_distance") -> pd.DataFrame:
    """Notebook 03's comparison as paired tests: per variant (uncontrolled, early stopped, mixed),
    every method against `baseline` on the same (seed, question) cells of the forget split (the
    long table of `control.variant_cells`). The paired mean difference of `metric` (method −
    baseline), its 95 % interval (grouped by seed), the sign-flip p-value, its Holm adjustment over
    the whole table (`p_value_holm`: one family) and the verdict (`stats.VERDICTS`), with
    `excludes_lower_by` and `reading` (`stats.paired_verdict`). The default metric is the distance of
    forget ROUGE-L to the retain model's on the same question (`evaluation.retain_distance`, SPEC §4):
    "lower" means the method ends closer to a model that never saw the facts; with the raw
    `rouge_l_recall`, "lower" would also reward damage below the retain model."""
    forget = cells[cells["split"] == "forget"]
    if baseline not in set(forget["method"]):
        raise ValueError(f"baseline method {baseline!r} is not among {sorted(set(forget['method']))}")
    verdicts = paired_verdicts(forget, compare="method", reference=baseline, within=["variant"], metrics=[metric])
    verdicts.insert(2, "baseline", baseline)
    return verdicts.assign(metric=f"forget_{metric}")
