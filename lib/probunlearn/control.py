"""Control of excessive unlearning (SPEC §3, [P2] Wang et al., *Unlearning with Control*, arXiv
2406.09179): early stopping against a utility bar and model mixing, and `unlearn_with_control`,
which runs one method and applies one of them (notebook 04).

Gradient ascent keeps pushing until the model is destroyed, so methods are compared only after
control, at matched utility. The bar is ρ·(the target's retain score), ρ = 0.9.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Mapping, Sequence

import torch

from probunlearn.evaluation import metric_scorer, question_cells, trace_metrics
from probunlearn.models import STACKED, is_stacked
from probunlearn.unlearning import UnlearningRun, load_adapter_state, unlearn
from probunlearn.utils import renamed_arguments

# ----------------------------------------------------------------------------- control (SPEC §3)
def utility_bar(target_score: float, rho: float = 0.9) -> float:
    """[P2]'s utility bar: ρ·(retain score of π_ref, the target). ρ = 0.9."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho is a fraction of the target's score in (0, 1], got {rho}")
    return rho * float(target_score)


def early_stopping(trace: Sequence[Mapping], bar: float, *, bar_metric: str = "retain_rouge_l_recall",
                   forget_metric: str = "forget_rouge_l_recall") -> dict:
    """[P2] early stopping: among the evaluated checkpoints whose `bar_metric` ≥ `bar`, the one with
    the most forgetting (lowest `forget_metric`; ties: higher `forget_nll` if traced, then the
    earlier step). Returns {'step', 'bar', bar_metric, forget_metric, 'met'}; when no checkpoint
    meets the bar (step 0 always does if the bar is ρ·its own score) it returns the checkpoint with
    the best `bar_metric` and met=False."""
    if not trace:
        raise ValueError("early_stopping got an empty trace: pass evaluate= to unlearn")
    for row in trace:
        for key in (bar_metric, forget_metric):
            if key not in row:
                raise KeyError(f"trace row of step {row.get('step')} has no {key!r}; it has {sorted(row)}")
    meeting = [row for row in trace if row[bar_metric] >= bar]
    if meeting:
        best = min(meeting, key=lambda r: (r[forget_metric], -r.get("forget_nll", 0.0), r["step"]))
    else:
        best = max(trace, key=lambda r: (r[bar_metric], -r["step"]))
    return {"step": int(best["step"]), "bar": float(bar), bar_metric: float(best[bar_metric]),
            forget_metric: float(best[forget_metric]), "met": bool(meeting)}


def _lora_b_parameters(model):
    names = [(n, p) for n, p in model.named_parameters() if "lora_B" in n or "lora_embedding_B" in n]
    if is_stacked(model):  # the unlearning adapter's, not the QLoRA target's beneath it
        names = [(n, p) for n, p in names if f".{STACKED}." in n]
    if not names:
        raise TypeError("the model has no LoRA adapter to mix: it must be a peft LoRA model")
    return names


@contextlib.contextmanager
@renamed_arguments(lam="mixing_weight")
def mixed_model(model, mixing_weight: float):
    """[P2] model mixing θ(λ) = θ_u + λ·(θ_ref − θ_u), inside a `with` block (λ: `mixing_weight`).

    With a LoRA update θ_u = θ_ref + B·A, this is the adapter scaled by (1 − λ): the lora_B
    matrices are multiplied by (1 − λ) and restored afterwards. λ = 0: the unlearned model;
    λ = 1: the target exactly (the adapter adds zeros). A save inside the block saves θ(λ)."""
    if not 0.0 <= mixing_weight <= 1.0:
        raise ValueError(f"the mixing weight λ must be in [0, 1], got {mixing_weight}")
    saved = {}
    with torch.no_grad():
        for name, param in _lora_b_parameters(model):
            saved[name] = param.detach().clone()
            param.mul_(1.0 - mixing_weight)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, param in _lora_b_parameters(model):
                param.copy_(saved[name])


def bisect_mixing(score_at: Callable[[float], float], bar: float, *, tolerance: float = 0.05,
                  score_at_zero: float | None = None, score_at_one: float | None = None) -> dict:
    """Smallest λ ∈ [0, 1] with `score_at(λ)` ≥ `bar`, by bisection (SPEC §3), assuming the score
    grows with λ (more of the target). Returns λ within `tolerance` above the boundary, always a λ
    that was seen to meet the bar (λ = 0 if the unlearned model already does; 1 if only the target
    does). `score_at_zero` / `score_at_one`: known scores of the endpoints, to save evaluations.
    Returns {'lambda', 'score', 'bar', 'met', 'evaluations': [(λ, score), ...] (known endpoints
    included), 'probes': how many times `score_at` ran}."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    evaluations, probes = [], []

    def score(lam, known=None):
        if known is None:
            probes.append(lam)
        value = float(score_at(lam) if known is None else known)
        evaluations.append((lam, value))
        return value

    def result(lam, value):
        return {"lambda": lam, "score": value, "bar": float(bar), "met": value >= bar, "evaluations": evaluations,
                "probes": len(probes)}

    zero = score(0.0, score_at_zero)
    if zero >= bar:
        return result(0.0, zero)
    one = score(1.0, score_at_one)
    if one < bar:  # not even the target meets the bar: nothing to bisect
        return result(1.0, one)
    lo, hi, hi_score = 0.0, 1.0, one
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        value = score(mid)
        if value >= bar:
            hi, hi_score = mid, value
        else:
            lo = mid
    return result(hi, hi_score)


def choose_mixing(model, score: Callable, bar: float, *, tolerance: float = 0.05,
                  score_at_zero: float | None = None, score_at_one: float | None = None) -> dict:
    """`bisect_mixing` on a peft model: `score(model) -> float` (the bar metric, e.g. retain
    ROUGE-L recall of greedy answers) is evaluated inside `mixed_model(model, λ)`."""
    def score_at(lam):
        with mixed_model(model, lam):
            return score(model)

    return bisect_mixing(score_at, bar, tolerance=tolerance, score_at_zero=score_at_zero,
                         score_at_one=score_at_one)


CONTROLS = ("early stopped", "mixed")
VARIANTS = ("uncontrolled", *CONTROLS)


def controlled_variants(model, run: UnlearningRun, *, bar: float, score: Callable, evaluate: Callable,
                        initial_evaluation: Mapping, bar_metric: str = "retain_rouge_l_recall",
                        mix_tolerance: float = 0.125) -> dict:
    """The three models of one finished run ([P2], SPEC §3): "uncontrolled" (the last checkpoint),
    "early stopped" (`early_stopping` on the trace) and "mixed" (`choose_mixing` on the last
    adapter, `score(model)` the bar metric). Each is {'step', 'lambda', 'state' (adapter tensors,
    to use inside `mixed_model(model, lambda)`), 'evaluation' (its trace row), 'choice'}.
    `evaluate(model) -> dict` (the trace's own evaluation) runs once more, for the mixed model,
    unless λ is 0 (the uncontrolled model) or 1 (the target, `initial_evaluation`). The model's
    adapter is left at the last checkpoint, unscaled."""
    last = run.trace[-1]
    stop = early_stopping(run.trace, bar, bar_metric=bar_metric)
    stopped = next(row for row in run.trace if row["step"] == stop["step"])
    load_adapter_state(model, run.checkpoints[last["step"]])
    mix = choose_mixing(model, score, bar, tolerance=mix_tolerance, score_at_zero=last[bar_metric],
                        score_at_one=initial_evaluation[bar_metric])
    lam = mix["lambda"]
    if lam == 0.0:
        mixed = last
    elif lam == 1.0:
        mixed = {"step": last["step"], **initial_evaluation}
    else:
        with mixed_model(model, lam):
            mixed = {"step": last["step"], **evaluate(model)}
    return {
        "uncontrolled": {"step": last["step"], "lambda": 0.0, "state": run.checkpoints[last["step"]],
                         "evaluation": last, "choice": None},
        "early stopped": {"step": stop["step"], "lambda": 0.0, "state": run.checkpoints[stop["step"]],
                          "evaluation": stopped, "choice": stop},
        "mixed": {"step": last["step"], "lambda": lam, "state": run.checkpoints[last["step"]], "evaluation": mixed,
                  "choice": mix},
    }


def variant_cells(variants: Mapping, metrics: Sequence[str] = ("rouge_l_recall", "keyword_hit")):
    """One row per (seed, method, variant, split, question) from {(seed, method): controlled_variants(...)}
    whose evaluations carry per-question lists (`trace_metrics(..., per_question=True)`): the cells
    that `stats.mean_interval` and `stats.paired_verdict` work on (`evaluation.question_cells` per
    model; `evaluation.retain_distance` adds each cell's distance to the retain model)."""
    import pandas as pd

    frames = [question_cells(chosen["evaluation"], metrics).assign(seed=seed, method=method, variant=variant)
              for (seed, method), by_variant in variants.items() for variant, chosen in by_variant.items()]
    return pd.concat(frames, ignore_index=True)[["seed", "method", "variant", "split", "question", *metrics]]


def rank_methods(summary, *, variants: Sequence[str] = ("mixed", "early stopped", "uncontrolled"),
                 distance: str = "forget_rouge_l_recall_distance", score: str = "forget_rouge_l_recall"):
    """The methods ranked per variant of a summary table (one row per (method, variant), with
    `distance` and `score` and their `_low` / `_high` intervals, e.g. `evaluation.summarise_splits`):
    by the mean `distance` to the retain model (SPEC §4: smallest = closest to never having seen the
    forget facts), and beside it the old reading, lowest `score` first, which rewards a model damaged
    below the retain model. [P2]: compare at matched utility (the controlled variants first); the
    uncontrolled ranking shows what a comparison without control would say. Columns: variant, rank,
    method, `distance` (+ `_low`, `_high`), `method_by_lowest_<score>`, `score` (+ interval)."""
    import pandas as pd

    for column in (distance, score):
        missing = [c for c in (column, f"{column}_low", f"{column}_high") if c not in summary]
        if missing:
            raise KeyError(f"the summary has no {', '.join(missing)}: summarise the cells with "
                           "evaluation.retain_distance's columns (evaluation.summarise_splits)")
    frames = []
    for variant in variants:
        rows = summary[summary["variant"] == variant]
        if rows.empty:
            continue
        closest = rows.sort_values(distance, kind="stable")[["method", distance, f"{distance}_low", f"{distance}_high"]]
        lowest = rows.sort_values(score, kind="stable")[["method", score, f"{score}_low", f"{score}_high"]]
        lowest = lowest.rename(columns={"method": f"method_by_lowest_{score}"})
        frames.append(pd.concat([closest.reset_index(drop=True), lowest.reset_index(drop=True)], axis=1)
                      .assign(variant=variant, rank=range(1, len(rows) + 1)))
    if not frames:
        raise ValueError(f"the summary has none of the variants {variants}; it has {sorted(set(summary['variant']))}")
    ranking = pd.concat(frames, ignore_index=True)
    return ranking[["variant", "rank", *[c for c in ranking.columns if c not in ("variant", "rank")]]]


def unlearn_with_control(model, tokenizer, forget_set, retain_set, *, method: str, eval_sets: Mapping,
                         bar: float, control: str = "mixed", bar_metric: str = "retain_rouge_l_recall",
                         initial_evaluation: dict | None = None, mix_tolerance: float = 0.125,
                         eval_max_new_tokens: int = 48, eval_batch_size: int = 32, **unlearn_kwargs) -> dict:
    """One method, unlearned then controlled (SPEC §3), as notebook 04 runs it: `unlearn` with
    greedy `trace_metrics` on `eval_sets` every `eval_every` steps, then `control` = "early
    stopped" (`early_stopping` on the trace) or "mixed" (`choose_mixing` on the last adapter).
    `unlearn_kwargs` go to `unlearn` (steps, learning_rate, batch_size, hparams, regularisers, ...);
    `eval_max_new_tokens` / `eval_batch_size` are those of the greedy evaluations.
    The model's adapter is left at the chosen checkpoint, *unscaled*: use it inside
    `mixed_model(model, result['lambda'])`. Returns {'run', 'choice' (what the control reported),
    'step', 'lambda', 'state' (the chosen checkpoint)}."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    evaluation = dict(max_new_tokens=eval_max_new_tokens, batch_size=eval_batch_size)
    run = unlearn(model, tokenizer, forget_set, retain_set, method=method, initial_evaluation=initial_evaluation,
                  evaluate=lambda m: trace_metrics(m, tokenizer, eval_sets, **evaluation), **unlearn_kwargs)
    last = run.trace[-1]["step"]
    if control == "early stopped":
        choice = early_stopping(run.trace, bar, bar_metric=bar_metric)
        step, lam = choice["step"], 0.0
    else:
        load_adapter_state(model, run.checkpoints[last])
        score = metric_scorer(tokenizer, eval_sets, bar_metric, **evaluation)
        start = initial_evaluation or run.trace[0]
        choice = choose_mixing(model, score, bar, tolerance=mix_tolerance, score_at_zero=run.trace[-1][bar_metric],
                               score_at_one=start[bar_metric])
        step, lam = last, choice["lambda"]
    load_adapter_state(model, run.checkpoints[step])
    return {"run": run, "choice": choice, "step": step, "lambda": lam, "state": run.checkpoints[step]}
