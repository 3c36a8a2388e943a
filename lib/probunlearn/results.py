"""What the notebooks leave in a results folder (`results/<profile>/`, the only channel between them),
by name: the tables and summaries each notebook writes and the later ones read (`save_artefact`,
`read_artefact`), where an unlearned model is saved for (method, control, seed) (`saved_model_dir`),
and the saved models a notebook evaluates, per seed (`list_models`, `model_runs`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from probunlearn.models import META_FILE
from probunlearn.utils import existing, load_json, save_json, save_table

# name -> file under the results folder, by the notebook that writes it. A `.json` holds a summary
# (a dict), a `.csv` a table; the names in `MARKDOWN_TOO` are also written as `.md` (`save_table`).
ARTEFACTS = {
    # 02 fine-tuning
    "finetune_summary": "finetune/summary.json",
    # 03 gradient-ascent baselines and their control
    "unlearning_summary": "unlearning/summary.json",
    "unlearning_traces": "unlearning/traces.json",
    "unlearning_cells": "unlearning/cells.csv",
    "mixing_calibration": "unlearning/calibration.csv",
    "unlearning_privacy": "unlearning/privacy.csv",
    "matched_utility": "unlearning/matched_utility.csv",
    "retain_distance_ranking": "unlearning/ranking.csv",
    # 04 entropy optimisation and adaptive temperature
    "entropy_summary": "entropy/summary.json",
    "entropy_headline": "entropy/headline.csv",
    "entropy_cells": "entropy/cells.csv",
    "entropy_verdicts": "entropy/verdicts.csv",
    "entropy_dynamics": "entropy/dynamics.csv",
    "entropy_runs": "entropy/runs.csv",
    "entropy_firing": "entropy/firing.csv",
    "entropy_sweep": "entropy/sweep.csv",
    "entropy_two_phase": "entropy/two_phase.csv",  # section 4, where the profile runs it
    "entropy_two_phase_cells": "entropy/two_phase_cells.csv",
    "entropy_two_phase_verdicts": "entropy/two_phase_verdicts.csv",
    # 05 probabilistic evaluation
    "probabilistic_summary": "probabilistic/summary.json",
    "probabilistic_cells": "probabilistic/cells.csv",
    "probabilistic_overview": "probabilistic/overview.csv",
    "probabilistic_claim": "probabilistic/claim.csv",
    "probabilistic_claim_verdicts": "probabilistic/claim_verdicts.csv",
    "probabilistic_facts": "probabilistic/facts.csv",
    "bounds_vs_n": "probabilistic/bounds_vs_n.csv",
    "leak_at_k": "probabilistic/leak_at_k.csv",
    "bound_coverage": "probabilistic/coverage.csv",
    # 06 attacks
    "attacks_summary": "attacks/summary.json",
    "attack_cells": "attacks/cells.csv",
    "attack_verdicts": "attacks/verdicts.csv",
    "attack_weights": "attacks/weights.csv",
    "attack_table": "attacks/table.csv",
}
MARKDOWN_TOO = ("matched_utility", "retain_distance_ranking", "entropy_headline", "entropy_two_phase", "attack_table",
                "probabilistic_claim")

# The models of notebook 02 that `list_models` lists first, in this order (`target_partial`: the
# partial-knowledge control, the target's recipe for fewer epochs).
FIRST_MODELS = ("base", "target", "retain", "target_partial")

# How notebook 03 names the model of each control (SPEC §3): `<method><suffix>`, e.g. ga_es, npo_mix.
CONTROL_SUFFIX = {"uncontrolled": "", "early stopped": "_es", "mixed": "_mix"}


def artefact_path(results: str | os.PathLike, name: str) -> Path:
    """Where the artefact `name` (a key of `ARTEFACTS`) lies in the results folder `results`."""
    if name not in ARTEFACTS:
        raise KeyError(f"unknown results artefact {name!r}; known: {', '.join(ARTEFACTS)}")
    return Path(results) / ARTEFACTS[name]


def save_artefact(results: str | os.PathLike, name: str, value: Any) -> Path:
    """Write the artefact `name`: a dict as JSON, a DataFrame as CSV (and Markdown for the names in
    `MARKDOWN_TOO`); returns its path."""
    path = artefact_path(results, name)
    if path.suffix == ".json":
        return save_json(value, path)
    if name in MARKDOWN_TOO:
        return save_table(value, path.stem, path.parent)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    value.to_csv(path, index=False)
    return path


def read_artefact(results: str | os.PathLike, name: str) -> Any:
    """Read what `save_artefact` wrote: a dict (JSON) or a DataFrame (CSV). A missing file names the
    notebook to run first (`utils.existing`)."""
    path = artefact_path(results, name)
    return load_json(path) if path.suffix == ".json" else pd.read_csv(existing(path))


def model_name(method: str, control: str) -> str:
    """The name notebook 03 saves the model of `method` under `control` as (`CONTROL_SUFFIX`)."""
    if control not in CONTROL_SUFFIX:
        raise KeyError(f"unknown control {control!r}; known: {', '.join(CONTROL_SUFFIX)}")
    return f"{method}{CONTROL_SUFFIX[control]}"


def saved_model_dir(results: str | os.PathLike, method: str, control: str, seed: int) -> Path:
    """`models/<model_name>/seed<seed>/` under the results folder: where notebook 03 saves an unlearned
    model of `SAVE_MODELS`, and notebooks 04-06 load it from."""
    return Path(results) / "models" / model_name(method, control) / f"seed{seed}"


def list_models(results: str | Path, base_model: str) -> dict[str, dict]:
    """Every model of a results folder, by name, as {seed: path}: `base` (the profile's MODEL, no
    directory), then each directory of `results/models/` that `load_model` can load (a saved adapter
    or a full model): `target` and `retain` from notebook 02, then the unlearned models of notebook 03
    in alphabetical order, which hold one model per unlearning seed (`<name>/seed<k>/`). A model
    without seeds maps to {None: path}: the same model for every seed."""
    def loadable(path: Path) -> bool:
        return path.is_dir() and ((path / META_FILE).exists() or (path / "config.json").exists())

    models = {"base": {None: str(base_model)}}
    folder = Path(results) / "models"
    rank = {name: i for i, name in enumerate(FIRST_MODELS)}
    for path in sorted((p for p in folder.glob("*") if p.is_dir()), key=lambda p: (rank.get(p.name, len(rank)), p.name)):
        if loadable(path):
            models[path.name] = {None: str(path)}
            continue
        seeds = {int(s.name.removeprefix("seed")): str(s) for s in path.glob("seed*")
                 if s.name.removeprefix("seed").isdigit() and loadable(s)}
        if seeds:
            models[path.name] = dict(sorted(seeds.items()))
    return models


def model_runs(results: str | os.PathLike, base_model: str, names: Sequence[str],
               seeds: Sequence[int]) -> tuple[dict[str, dict], list[tuple]]:
    """The models `names` of a results folder with this run's `seeds`: `(models, runs)`. `models` maps
    each name found, in `list_models`' order, to {seed: path} (a model saved without seeds keeps {None:
    path}; a folder may hold models of an earlier run with more seeds, which are left out). `runs` lists
    (name, seed, path): an unlearned model once per seed, a model without seeds once, with the first seed."""
    models = {name: {seed: path for seed, path in by_seed.items() if seed is None or seed in seeds}
              for name, by_seed in list_models(results, base_model).items() if name in names}
    runs = [(name, seed, path) for name, by_seed in models.items()
            for seed, path in (by_seed.items() if None not in by_seed else [(seeds[0], by_seed[None])])]
    return models, runs


def model_identity(path: str | os.PathLike) -> tuple:
    """What a saved model is, from the meta notebook 03 writes beside an unlearned adapter: `("target",)`
    for a model equal to the target (unlearning step 0, or mixed at λ = 1), `(method, seed, step, λ)`
    for an unlearned one (its early-stopped and mixed versions may be the same model, e.g. an early stop
    at the last step with λ = 0), `("path", path)` for anything else (target, retain, a base model)."""
    meta_path = Path(path) / META_FILE
    meta = load_json(meta_path) if meta_path.exists() else {}
    if not {"method", "seed", "step", "lambda"} <= meta.keys():
        return ("path", str(path))
    if meta["step"] == 0 or float(meta["lambda"]) == 1.0:
        return ("target",)
    return (meta["method"], int(meta["seed"]), int(meta["step"]), round(float(meta["lambda"]), 9))


def same_models(runs: Sequence[tuple]) -> dict[tuple, tuple]:
    """For the (name, seed, path) runs of `model_runs`: (name, seed) -> the (name, seed) of the first
    run that is the same model (`model_identity`), for every run that repeats an earlier one; a model
    equal to the target repeats the run of `target` when that is among the runs. Notebook 05 samples
    each model once and copies its numbers to the names that repeat it."""
    first, repeats = {}, {}
    for name, seed, path in runs:
        identity = ("target",) if name == "target" else model_identity(path)
        if identity in first:
            repeats[name, seed] = first[identity]
        else:
            first[identity] = (name, seed)
    return repeats
