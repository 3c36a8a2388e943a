"""[P1]'s fix, measured: entropy optimisation and adaptive temperature against the same base methods,
over seeds, with intervals and paired verdicts (SPEC §2, §6.2; notebook 04).

[P1] Scholten, Günnemann, Schwinn, ICLR 2025, §5. What this module computes:

- `leakage_point(model, ...)`: one point of the unlearning dynamics: greedy forget and retain
  ROUGE-L, the share of forget questions whose greedy answer leaks, and the forget set's sampled
  leakage (M_bin per question and its mean, leak rate), in one decoding pass;
- `run_to_bar(model, ...)`: an unlearning run evaluated every few steps until it has fallen below
  the utility bar, keeping its best point above the bar (the model the regime test samples);
  `best_above_bar(trace)` finds that point in a saved trace;
- `continue_runs(model, ...)`: a second phase from one such point: the plain objective (the control)
  and each variant (e.g. + EO at several λ_f, padded as [P1]'s code pads, or the term alone under the
  objective `none`) for the same steps;
- `reading_cells(evaluated)`: the per-question cells of a model sampled plainly and under each
  reading of adaptive temperature (`temperature.evaluate_adaptive`), for `stats`;
- `variant_table(cells)`: per method, condition and variant, the means with 95 % intervals;
- `verdict_table(cells)`: each variant against its method's baseline on the same (seed, question)
  cells of forget M_bin, as an honest family: duplicates dropped, "changed no sample" and "cannot
  show a reduction at this n" kept out of it, Holm over the rest (`stats.paired_verdict`: interval
  grouped by seed, sign-flip p-value);
- `firing_curve(entropies, thresholds)`: how often the entropy rule of adaptive temperature would
  fire for each threshold h_τ, on forget and retain decoding steps;
- `sweep_table(evaluated)`: what each setting of a reading does to forget leakage and retain
  diversity (`evaluate_adaptive(..., sweep=...)`), beside plain sampling: a calibration curve.

Variants (the rows of the headline): the base method (`baseline`), with adaptive temperature in
each reading (`+ AT (entropy)`, `+ AT (confidence)`), with entropy optimisation (`+ entropy`), and
with both (`+ entropy + AT (...)`). Notebook 04's condition is each run's best point above the
utility bar; `method_verdicts` serves notebook 03's comparison of methods.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from probunlearn import bounds
from probunlearn.metrics import is_leak, keyword_hit, rouge_l_recall
from probunlearn.probabilistic import question_cells
from probunlearn.sampling import GREEDY, answer_texts, sample_rows
from probunlearn.stats import holm_verdicts, paired_verdicts, summarise_cells
from probunlearn.unlearning import UnlearningRun, adapter_state, load_adapter_state, unlearn

__all__ = ["leakage_point", "run_to_bar", "continue_runs", "best_above_bar", "reading_cells", "variant_name",
           "variant_table", "verdict_table", "firing_curve", "sweep_table", "MODES"]

MODES = ("plain", "entropy", "confidence")  # sampling: plain, or adaptive temperature in either reading


def leakage_point(model, tokenizer, forget_set, retain_set, *, num_samples: int, max_new_tokens: int,
                  temperature: float = 1.0, top_p: float = 1.0, alpha: float = bounds.ALPHA, leak_tau: float = 0.5,
                  seed: int = 0, batch_size: int | None = None) -> dict:
    """The numbers of one point of the unlearning dynamics, from one decoding pass: greedy answers to
    every question of both sets and `num_samples` sampled answers to each forget question.
    Returns `forget_rouge_l_recall`, `forget_keyword_hit`, `retain_rouge_l_recall` (greedy, means),
    `forget_m_bin` (mean over forget questions of M_bin, SPEC §5), `forget_m_bin_questions` (the
    per-question values, for an interval), `forget_leak_rate` (share of leaking samples) and
    `forget_greedy_leak`; usable as `unlearn(..., evaluate=...)`."""
    forget, retain = list(forget_set), list(retain_set)
    questions = [r["question"] for r in forget + retain]
    rows = [(i, GREEDY) for i in range(len(questions))] + [(i, j) for i in range(len(forget)) for j in range(num_samples)]
    ids = sample_rows(model, tokenizer, questions, rows, temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, progress=False)
    texts = dict(zip(rows, answer_texts(tokenizer, ids)))
    greedy = [texts[i, GREEDY] for i in range(len(questions))]
    leaks = np.array([[is_leak(texts[i, j], r["answer"], r["keywords"], leak_tau) for j in range(num_samples)]
                      for i, r in enumerate(forget)])
    m_bin = bounds.binary_leak_upper(leaks, alpha)
    return {
        "forget_rouge_l_recall": float(np.mean([rouge_l_recall(g, r["answer"]) for g, r in zip(greedy, forget)])),
        "forget_keyword_hit": float(np.mean([keyword_hit(g, r["keywords"]) for g, r in zip(greedy, forget)])),
        "retain_rouge_l_recall": float(np.mean([rouge_l_recall(g, r["answer"])
                                                for g, r in zip(greedy[len(forget):], retain)])),
        "forget_greedy_leak": float(np.mean([is_leak(g, r["answer"], r["keywords"], leak_tau)
                                             for g, r in zip(greedy, forget)])),
        "forget_m_bin": float(np.mean(m_bin)),
        "forget_m_bin_questions": [float(v) for v in np.atleast_1d(m_bin)],
        "forget_leak_rate": float(leaks.mean()),
    }


def run_to_bar(model, tokenizer, forget_set, retain_set, *, bar: float, evaluate: Callable,
               bar_metric: str = "retain_rouge_l_recall", select: str = "forget_m_bin", stop_below: int = 2,
               initial_evaluation: Mapping | None = None, **unlearn_args) -> tuple[UnlearningRun, dict]:
    """An unlearning run (`unlearning.unlearn`, its other arguments in `unlearn_args`) followed past
    the utility bar and no further: `evaluate` runs before the first step and every `eval_every`
    steps, and the run stops once `stop_below` evaluations in a row fall below `bar` on `bar_metric`
    (a later step could not be a point above the bar that a control would keep, unless the run came
    back up). Meanwhile it keeps a copy of the trained weights at its best point above the bar: the
    evaluation with the lowest `select` among those meeting the bar (ties: the later one). With full
    fine-tuning that copy is every weight, one model's worth of memory. `initial_evaluation`: the
    row `evaluate` gives before the first step, when the caller has it already (every run of a
    series that starts from the target with the same evaluation seed starts from the same row).

    Returns `(run, best)`: `best` = {'step', 'row' (that evaluation), 'state' (`adapter_state`)}."""
    best: dict = {}
    calls = {"n": 0}

    def observe(m):
        row = dict(initial_evaluation) if calls["n"] == 0 and initial_evaluation is not None else evaluate(m)
        calls["n"] += 1
        if row[bar_metric] >= bar and (not best or row[select] <= best["row"][select]):
            best.update(index=calls["n"] - 1, row=row, state=adapter_state(m))
        return row

    def stop(trace):
        return len(trace) >= stop_below and all(r[bar_metric] < bar for r in trace[-stop_below:])

    for key in ("evaluate", "stop_when", "keep_checkpoints"):
        if key in unlearn_args:
            raise TypeError(f"run_to_bar sets {key!r} itself")
    run = unlearn(model, tokenizer, forget_set, retain_set, evaluate=observe, stop_when=stop,
                  keep_checkpoints=False, **unlearn_args)
    if not best:
        raise ValueError(f"no evaluation met the bar {bar:.3f} on {bar_metric}, not even before the first step")
    best["step"] = int(run.trace[best.pop("index")]["step"])
    return run, best


def continue_runs(model, tokenizer, forget_set, retain_set, start: Mapping, arms: Mapping[str, Sequence[Callable] | Mapping],
                  *, evaluate: Callable, steps: int, pad_to: int | None = None, **unlearn_args) -> dict:
    """A second phase of unlearning (issue 24's two-phase run): from one state of the trained weights
    (`start`, an `adapter_state`, e.g. plain GA at its best point above the utility bar), each arm
    continues for the same `steps` steps over the same batches (`unlearn_args` as `unlearning.unlearn`,
    its `seed` included; each arm gets a fresh optimiser) with its own `regularisers` (an empty list:
    the plain objective, the control), and `evaluate(model)` measures where it ends. An arm may also be
    a mapping {'regularisers': [...], 'method': ..., 'hparams': ...} that replaces the run's method
    for that arm, e.g. method 'none' with an entropy regulariser: the term alone, without the
    unlearning objective. `pad_to` pads the batches of the arms with regularisers only: the plain
    objectives average over answer tokens and do not notice padding, so their arm runs unpadded (and
    faster) to the same step. The model ends holding `start` again.

    Returns {arm: {'result': evaluate(model), 'seconds': training time, 'log': the run's step log}}."""
    for key in ("regularisers", "evaluate", "eval_every", "keep_checkpoints"):
        if key in unlearn_args:
            raise TypeError(f"continue_runs sets {key!r} itself")
    ended = {}
    try:
        for arm, spec in arms.items():
            spec = dict(spec) if isinstance(spec, Mapping) else {"regularisers": spec}
            unknown = set(spec) - {"regularisers", "method", "hparams"}
            if unknown:
                raise ValueError(f"arm {arm!r}: unknown keys {sorted(unknown)} (regularisers, method, hparams)")
            regularisers = list(spec.pop("regularisers", ()))
            if "method" in spec and "hparams" not in spec:
                spec["hparams"] = {}  # another method: its own defaults, not the run's method's
            load_adapter_state(model, start)
            run = unlearn(model, tokenizer, forget_set, retain_set, steps=steps, regularisers=regularisers,
                          pad_to=pad_to if regularisers else None, keep_checkpoints=False, **{**unlearn_args, **spec})
            ended[arm] = {"result": evaluate(model), "seconds": run.seconds, "log": run.log}
    finally:
        load_adapter_state(model, start)
    return ended


def best_above_bar(trace: pd.DataFrame, bar: float, *, bar_metric: str = "retain_rouge_l_recall",
                   select: str = "forget_m_bin") -> pd.Series:
    """The row of one run's trace that `run_to_bar` keeps: the lowest `select` among the rows meeting
    `bar` (ties: the later step)."""
    above = trace[trace[bar_metric] >= bar]
    if above.empty:
        raise ValueError(f"no row of the trace meets the bar {bar:.3f}")
    return above.sort_values([select, "step"], ascending=[True, False]).iloc[0]


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
    interval (grouped by seed: seeds, then questions within), the sign-flip p-value and the verdict
    (`stats.paired_verdict`, with `excludes_lower_by` and `reading`), as one honest family:

    - a variant whose cells equal those of a variant listed before it (e.g. "+ entropy + AT (entropy)"
      where that reading re-decoded nothing, a copy of "+ entropy") is dropped: it is not a second
      finding (`duplicate_of` in `attrs["dropped"]`);
    - a variant that changed no cell of its baseline is "changed no sample", not a verdict;
    - where no sample of the baseline leaked on any cell (`leak_rate` 0: every M_bin at the floor of
      its n), the variant cannot come out lower: "cannot show a reduction at this n";
    - the other rows are the family: `p_value_holm` (Holm over them only), and a "lower" or "higher"
      stands only where that adjusted p-value is below 0.05 (`stats.holm_verdicts`)."""
    forget = cells[cells["split"] == "forget"]
    keep, dropped = [], []
    for key, group in forget.groupby(["condition", "method"], sort=False):
        seen = {}
        for variant, part in group.groupby("variant", sort=False):
            values = tuple(part.sort_values(["seed", "question"])[metric].round(12))
            if variant != baseline and values in seen and seen[values] != baseline:
                dropped.append({"condition": key[0], "method": key[1], "variant": variant, "duplicate_of": seen[values]})
                continue
            seen.setdefault(values, variant)
            keep.append(part)
    forget = pd.concat(keep, ignore_index=True)
    verdicts = paired_verdicts(forget, compare="variant", reference=baseline, within=["condition", "method"],
                               metrics=[metric], family=False)
    verdicts.loc[verdicts["verdict"] == "no difference", ["verdict", "reading"]] = ["changed no sample", "changed no sample"]
    floor = (forget[forget["variant"] == baseline].groupby(["condition", "method"], sort=False)["leak_rate"].max() == 0
             if "leak_rate" in forget.columns else pd.Series(dtype=bool))
    at_floor = [bool(floor.get((c, m), False)) for c, m in zip(verdicts["condition"], verdicts["method"])]
    at_floor = pd.Series(at_floor, index=verdicts.index) & (verdicts["verdict"] != "changed no sample")
    verdicts.loc[at_floor, "verdict"] = "cannot show a reduction at this n"
    verdicts.loc[at_floor, "reading"] = "cannot show a reduction at this n: no sample of the baseline leaked"
    verdicts = holm_verdicts(verdicts).assign(metric=f"forget_{metric}")
    verdicts.attrs["dropped"] = dropped
    return verdicts


def firing_curve(entropies: Mapping[str, np.ndarray], thresholds) -> pd.DataFrame:
    """Where the entropy rule of adaptive temperature would act: for each threshold h_τ (nats), the
    share of decoding steps of each split whose next-token entropy is below it (`fires_<split>`),
    and the quantile of the `retain` split's entropies that h_τ is (the calibration quantile that
    would give it, `retain_quantile`). `entropies`: per-step entropies of plain sampling per split
    (`temperature.evaluate_adaptive(...)["entropies"]`)."""
    rows = []
    for h in np.asarray(thresholds, dtype=float):
        row = {"threshold": float(h)}
        for split, values in entropies.items():
            row[f"fires_{split}"] = float(np.mean(np.asarray(values) < h)) if len(values) else float("nan")
        if "retain" in entropies and len(entropies["retain"]):
            row["retain_quantile"] = row["fires_retain"]
        rows.append(row)
    return pd.DataFrame(rows)


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


def sweep_table(evaluated: Mapping, metrics: Sequence[str] = ("m_bin", "leak_rate", "distinct_2")) -> pd.DataFrame:
    """One row per setting of an `evaluate_adaptive(..., sweep=...)` result, plus plain sampling
    (`reading` "plain") and the readings' own settings: `reading`, `setting` (the calibration
    quantile of the entropy rule, or c_T), `threshold` (h_τ or c_T), the mean over questions of each
    metric per split (`forget_m_bin`, `retain_distinct_2`, ...), and per split `fire_rate` and
    `redrawn`. A setting helps where forget leakage falls by more than retain diversity does."""
    def means(tables):
        return {f"{split}_{m}": float(table[m].mean()) for split, table in tables.items() for m in metrics}

    rows = [{"reading": "plain", "setting": np.nan, "threshold": np.nan,
             **means({split: table for split, (table, _) in evaluated["plain"].items()}),
             **{f"{split}_fire_rate": 0.0 for split in evaluated["plain"]}}]
    default = {"entropy": evaluated.get("quantile"), "confidence": evaluated["threshold"].get("confidence")}
    for reading, by_split in evaluated["adaptive"].items():
        rows.append({"reading": reading, "setting": default.get(reading), "threshold": evaluated["threshold"][reading],
                     **means({split: table for split, (table, _) in by_split.items()}),
                     **{f"{split}_fire_rate": v for split, v in evaluated["fire_rate"][reading].items()},
                     **{f"{split}_redrawn": v for split, v in evaluated["redrawn"][reading].items()}})
    for entry in evaluated.get("sweep", []):
        rows.append({"reading": entry["reading"], "setting": entry["setting"], "threshold": entry["threshold"],
                     **means(entry["tables"]), **{f"{split}_fire_rate": v for split, v in entry["fire_rate"].items()},
                     **{f"{split}_redrawn": v for split, v in entry["redrawn"].items()}})
    return pd.DataFrame(rows).sort_values(["reading", "threshold"], na_position="first", ignore_index=True)
