"""What the notebooks leave in a results folder (`results/<profile>/`, the only channel between them),
by name: the tables and summaries each notebook writes and the later ones read (`save_artefact`,
`read_artefact`), and where an unlearned model is saved for (method, control, seed)
(`saved_model_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from probunlearn.utils import load_json, save_json, save_table

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
    # 04 entropy optimisation and adaptive temperature
    "entropy_summary": "entropy/summary.json",
    "entropy_headline": "entropy/headline.csv",
    "entropy_cells": "entropy/cells.csv",
    "entropy_verdicts": "entropy/verdicts.csv",
    "entropy_dynamics": "entropy/dynamics.csv",
    # 05 probabilistic evaluation
    "probabilistic_summary": "probabilistic/summary.json",
    "probabilistic_cells": "probabilistic/cells.csv",
    "probabilistic_overview": "probabilistic/overview.csv",
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
MARKDOWN_TOO = ("matched_utility", "entropy_headline", "attack_table")

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
    notebook to run first (`utils.load_json`)."""
    path = artefact_path(results, name)
    if path.suffix == ".json":
        return load_json(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the notebook that writes it first (see README, 'Notebooks')")
    return pd.read_csv(path)


def model_name(method: str, control: str) -> str:
    """The name notebook 03 saves the model of `method` under `control` as (`CONTROL_SUFFIX`)."""
    if control not in CONTROL_SUFFIX:
        raise KeyError(f"unknown control {control!r}; known: {', '.join(CONTROL_SUFFIX)}")
    return f"{method}{CONTROL_SUFFIX[control]}"


def saved_model_dir(results: str | os.PathLike, method: str, control: str, seed: int) -> Path:
    """`models/<model_name>/seed<seed>/` under the results folder: where notebook 03 saves an unlearned
    model of `SAVE_MODELS`, and notebooks 04-06 load it from."""
    return Path(results) / "models" / model_name(method, control) / f"seed{seed}"
