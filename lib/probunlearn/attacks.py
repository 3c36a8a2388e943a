"""The cheap attacks on an unlearned model (notebook 06): relearning on half of the forget questions,
a 4-bit and an 8-bit reload of its weights (the quantisation attack of Zhang et al. 2024, arXiv
2410.16454, through `quantization`), and sampling; each attacked model is evaluated by sampling on
the other half of the forget questions (`probabilistic.evaluate_model`), and the verdicts pair every
attack with no attack on the same (seed, question) cells.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from probunlearn.hardware import model_device
from probunlearn.models import adapter_base, add_lora, load_adapter, load_model, merge_adapter
from probunlearn.probabilistic import evaluate_model, question_cells, spread_subset
from probunlearn.quantization import quantization_code_change, quantized_copies, quantized_copy
from probunlearn.results import model_runs
from probunlearn.stats import paired_verdicts
from probunlearn.training import train_lora

NO_ATTACK = "none"
RELEARNED = "relearned"
# The verdict of "is the model without an attack lower than the attacked one?" (`stats.VERDICTS`), as
# notebook 06 names it.
VERDICT_NAMES = {"lower": "brings back", "higher": "leaks less after the attack", "inconclusive": "inconclusive",
                 "no difference": "changes nothing"}


def relearning_halves(forget, num_measured: int | None):
    """`(relearn_set, measured)`: every author's forget questions alternate between the relearning
    half and the measured half (first, third, ... question of an author: relearning), and the measured
    half is cut to `num_measured` questions spread over it (`spread_subset`; None: all)."""
    position, half = {}, []
    for author in forget["author"]:
        position[author] = position.get(author, -1) + 1
        half.append(position[author] % 2)
    relearn_set = forget.select([i for i, h in enumerate(half) if h == 0])
    measured = spread_subset(forget.select([i for i, h in enumerate(half) if h == 1]), num_measured)
    if set(relearn_set["question"]) & set(measured["question"]):
        raise ValueError("a question is in both halves: the forget set repeats a question")
    return relearn_set, measured


def attack_runs(results: str | Path, base_model: str, names: Sequence[str], seeds: Sequence[int]):
    """`(target_dir, runs)`: the saved target of a results folder, and the models to attack as
    (name, seed, path), in the order of `names`: an unlearned model once per seed in `seeds`, a model
    saved without seeds (the references: target, retain) once, with the first seed (`model_runs`)."""
    models, runs = model_runs(results, base_model, ["target", *names], seeds)
    missing = [name for name in ["target", *names] if name not in models]
    if missing:
        raise FileNotFoundError(f"no saved model {missing} under {Path(results) / 'models'}: "
                                "run notebook 03 with them in SAVE_MODELS")
    return models["target"][None], [run for name in names for run in runs if run[0] == name]


RELEARN_MICRO_BATCH = 8  # rows per part of a relearning step on a GPU (`train_lora`'s micro_batch_size)


def relearned(model, tokenizer, relearn_set, *, steps: int, learning_rate: float, lora_r: int,
              top_layers: int | None, seed: int, micro_batch_size: int | None = None):
    """The relearning attack: a fresh LoRA adapter (rank `lora_r`, alpha 2r) on `model` itself,
    trained for `steps` AdamW steps on all of `relearn_set` at once, merged. `micro_batch_size`:
    each step in parts of this many rows, gradients added (default: `RELEARN_MICRO_BATCH` on a GPU,
    with gradient checkpointing, where the paper profile's 200 questions in one pass plan far past
    24 GB, `memory`; the whole set at once on a CPU, as the cpu results were made)."""
    gpu = model_device(model).type == "cuda"
    if micro_batch_size is None and gpu:
        micro_batch_size = RELEARN_MICRO_BATCH
    model = add_lora(model, r=lora_r, lora_alpha=2 * lora_r, top_layers=top_layers, gradient_checkpointing=gpu)
    train_lora(model, tokenizer, relearn_set, epochs=steps, learning_rate=learning_rate,
               batch_size=len(relearn_set), seed=seed, micro_batch_size=micro_batch_size, progress=False)
    return merge_adapter(model)


def weight_change(target_state: dict, model, target_4bit, model_4bit) -> dict:
    """How far unlearning moved the blocks' weight matrices: the mean relative norm of the update,
    and the share of 4-bit NF4 codes in which the two models' 4-bit reloads differ."""
    state = model.state_dict()
    delta = [(state[k] - w).norm() / w.norm() for k, w in target_state.items() if w.ndim == 2 and ".layers." in k]
    return {"relative_update": float(torch.stack(delta).mean()),
            "nf4_codes_changed": quantization_code_change(target_4bit, model_4bit)}


def attack_cells(runs, target_dir, measured, relearn_set, *, quantizations: Sequence[str], relearn_steps: int,
                 relearn_learning_rate: float, relearn_lora_r: int, top_layers: int | None,
                 sampling: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Every model of `runs` without an attack and under each attack: `(cells, weights, seconds)`.

    For each (name, seed, path): the model (an unlearned one as trained: its adapter beside a copy
    of the target's weights), its quantised reloads (made first) and the model relearned (`relearned`,
    seeded with the model's seed); both attacks start from the adapter merged into a float32 copy,
    so that they act on the whole update (the relearned model then runs in float32). Each is
    evaluated on `measured` with `evaluate_model(..., seed=seed, **sampling)`; `cells` holds one row
    per (model, seed, attack, question) (`question_cells`).
    `weights`: `weight_change` of each unlearned model (when "4bit" is among `quantizations`);
    `seconds`: wall time per model and seed. Prints one line per model."""
    attacks = [NO_ATTACK, RELEARNED, *quantizations]
    cells, weights, seconds = [], [], {}
    target, tokenizer = load_model(target_dir)
    target_4bit = quantized_copy(target, "4bit") if "4bit" in quantizations else None
    target_state = {k: v.detach().clone() for k, v in target.state_dict().items()}
    on_target = lambda path: Path(adapter_base(path)).resolve() == Path(target_dir).resolve()
    for name, seed, path in runs:
        tick = time.perf_counter()
        if name == "target":
            model = full = copy.deepcopy(target)
        elif on_target(path):  # an unlearned model: its adapter on a copy of the target (no reload from disk)
            model = load_adapter(copy.deepcopy(target), path).eval()  # as trained: the adapter beside the weights
            # merged in float32, so the update is all there (merged into bfloat16 weights, most of a small
            # update would round away: an attack of its own, before any attack)
            full = merge_adapter(load_adapter(copy.deepcopy(target).float(), path))
        else:
            model, _ = load_model(path)
            full = model
        attacked = {NO_ATTACK: model, **quantized_copies(full, quantizations)}
        if target_4bit is not None and name != "target":
            weights.append({"model": name, "seed": seed,
                            **weight_change(target_state, full, target_4bit, attacked["4bit"])})
        for attack in attacks:
            if attack == RELEARNED:  # trains the full-precision merge (the quantised copies are already made)
                attacked[RELEARNED] = relearned(full, tokenizer, relearn_set, steps=relearn_steps,
                                                learning_rate=relearn_learning_rate, lora_r=relearn_lora_r,
                                                top_layers=top_layers, seed=seed)
            table, raw = evaluate_model(attacked[attack], tokenizer, {"forget": measured}, seed=seed, **sampling)["forget"]
            cells.append(question_cells(table).assign(model=name, seed=seed, attack=attack))
            if attack != NO_ATTACK:
                del attacked[attack]  # one quantised copy at a time in memory
        del model, full, attacked
        seconds[f"{name}@seed{seed}"] = time.perf_counter() - tick
        last = pd.concat(cells[-len(attacks):])
        print(f"{name:>8} seed {seed}: greedy leak / M_bin " + ", ".join(
            f"{a} {g['greedy_leak'].mean():.2f}/{g['m_bin'].mean():.2f}" for a, g in last.groupby("attack", sort=False))
              + f"  ({seconds[f'{name}@seed{seed}']:.0f} s)")
    return pd.concat(cells, ignore_index=True), pd.DataFrame(weights), seconds


def attack_verdicts(cells: pd.DataFrame, metrics: Sequence[str] = ("greedy_leak", "m_bin")) -> pd.DataFrame:
    """Per model, attack and metric: does the attack bring facts back? The paired difference
    (attacked − no attack) on the same (seed, question) cells, its 95 % interval (grouped by seed:
    seeds, then questions within), the sign-flip p-value, its Holm adjustment over all the rows (one
    family, `stats.holm_verdicts`) and the verdict (`VERDICT_NAMES`: "brings back" when the model
    without the attack is lower, "leaks less after the attack" when it is higher, "changes nothing"
    when every cell is the same; "brings back" or "leaks less" only where the Holm-adjusted p-value is
    below 0.05 too, else "inconclusive")."""
    verdicts = paired_verdicts(cells, compare="attack", reference=NO_ATTACK, within=["model"], metrics=metrics,
                               reference_role="variant", sort_cells=True)
    return pd.DataFrame({"model": verdicts["model"], "attack": verdicts["attack"], "metric": verdicts["metric"],
                         "difference": 0.0 - verdicts["mean_difference"], "difference_low": 0.0 - verdicts["high"],
                         "difference_high": 0.0 - verdicts["low"], "p_value": verdicts["p_value"],
                         "p_value_holm": verdicts["p_value_holm"], "cells": verdicts["cells"],
                         "verdict": verdicts["verdict"].map(VERDICT_NAMES)})
