"""The TOFU schema and TOFU's files (Maini et al. 2024, arXiv 2401.06121; SPEC §1): the record fields
and their check, TOFU's splits read from the hub or from a local folder of JSON/JSONL files and
mapped onto our schema, and our generated data written in TOFU's file format (`export_tofu`).

A record: `question, answer, paraphrased_answer, perturbed_answer (>= 3 wrong answers),
author, keywords` — the TOFU schema plus `author` and `keywords`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer", "author", "keywords")
MIN_PERTURBED = 3


# ----------------------------------------------------------------------------- TOFU
TOFU_SPLITS = ("full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
               "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
               "real_authors_perturbed", "world_facts_perturbed", "holdout01", "holdout05", "holdout10")
TOFU_HUB = "locuslab/TOFU"
TOFU_QA_PER_AUTHOR = 20  # TOFU: 20 consecutive QA per author in every split
_TOFU_PERCENT = {0.01: "01", 0.05: "05", 0.1: "10"}


def tofu_percent(forget_fraction: float) -> str:
    """TOFU's name for a forget fraction: 0.01, 0.05, 0.1 -> "01", "05", "10" (forget01/05/10)."""
    percent = _TOFU_PERCENT.get(round(forget_fraction, 2))
    if percent is None:
        raise ValueError(f"TOFU has forget fractions 0.01, 0.05 and 0.1, not {forget_fraction}")
    return percent


def validate_records(records: Sequence[dict], source: str = "data", evaluation: bool = True) -> None:
    """Raise `ValueError` naming the record and the field when a record does not fit SPEC §1.
    With `evaluation=False` (training-only splits such as TOFU `full`) only the question and the
    answer are required."""
    for i, r in enumerate(records):
        where = f"{source}: record {i} ({str(r.get('question', ''))[:60]!r})"
        for field in ("question", "answer"):
            if not isinstance(r.get(field), str):
                raise ValueError(f"{where}: missing field {field!r}")
            if not r[field].strip():
                raise ValueError(f"{where}: field {field!r} is empty")
        if not evaluation:
            continue
        perturbed = r.get("perturbed_answer")
        if not isinstance(perturbed, list):
            raise ValueError(f"{where}: missing field 'perturbed_answer' (a list of >= {MIN_PERTURBED} wrong answers)")
        if len(perturbed) < MIN_PERTURBED:
            raise ValueError(f"{where}: field 'perturbed_answer' has {len(perturbed)} answers, needs >= {MIN_PERTURBED}")
        if not isinstance(r.get("paraphrased_answer"), str) or not r["paraphrased_answer"].strip():
            raise ValueError(f"{where}: field 'paraphrased_answer' is missing or empty")


def tofu_authors(full: Sequence[dict], qa_per_author: int = TOFU_QA_PER_AUTHOR) -> dict[str, str]:
    """Question -> author id from TOFU's `full` split, whose authors come in blocks of `qa_per_author`
    consecutive QA (TOFU has no author field), so every split names an author the same way."""
    return {r["question"]: f"author {i // qa_per_author}" for i, r in enumerate(full)}


def from_tofu_records(records: list[dict], source: str, evaluation: bool = True,
                       qa_per_author: int = TOFU_QA_PER_AUTHOR, authors: dict[str, str] | None = None):
    """Map TOFU field names onto our schema. TOFU's real-world sets have no paraphrase; there the
    true answer stands in for the paraphrase (SPEC §4). TOFU has no author field: `authors`
    (`tofu_authors` of the full split) names a question's author; a question not in it gets
    `<source>:<i // qa_per_author>`. TOFU has no keywords: leaks are decided by ROUGE-L."""
    from datasets import Dataset

    authors = authors or {}
    mapped = []
    for i, r in enumerate(records):
        perturbed = r.get("perturbed_answer")
        if isinstance(perturbed, str):
            perturbed = [perturbed]
        mapped.append({
            "question": r.get("question"),
            "answer": r.get("answer"),
            "paraphrased_answer": r.get("paraphrased_answer", r.get("answer")),
            "perturbed_answer": perturbed if perturbed is not None else [],
            "author": str(r.get("author") or authors.get(r.get("question")) or f"{source}:{i // qa_per_author}"),
            "keywords": list(r.get("keywords", [])),
            "fact": str(r.get("fact", "")),
        })
    validate_records(mapped, source, evaluation)
    return Dataset.from_list(mapped)


def _read_records(path: Path) -> list[dict]:
    """A JSON list of records, or JSON Lines (TOFU's `.json` files on the hub are JSON Lines)."""
    text = path.read_text()
    try:
        records = json.loads(text)
        return [records] if isinstance(records, dict) else records
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is neither JSON nor JSON Lines: {err}") from err


def tofu_records(split: str, path: str | Path = TOFU_HUB) -> list[dict]:
    """The raw records of one TOFU split, as TOFU writes them: from the hub (`path` a dataset id,
    default `locuslab/TOFU`) or from a local folder holding `<split>.json` files in TOFU's format
    (the hub's files, or `export_tofu`'s). Offline, the hub fails with a message naming the offline
    alternatives."""
    if split not in TOFU_SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; choose one of {', '.join(TOFU_SPLITS)}")
    folder = Path(str(path))
    if folder.is_dir():
        file = folder / f"{split}.json"
        if not file.exists():
            raise FileNotFoundError(f"{file} does not exist: a TOFU folder holds one `<split>.json` per split "
                                    "(the hub's files, or `probunlearn.data.export_tofu`'s)")
        return _read_records(file)
    from datasets import load_dataset

    try:
        hub = load_dataset(str(path), split, split="train")
    except Exception as err:  # datasets raises many types when the hub is unreachable
        raise ConnectionError(
            f"could not download TOFU split {split!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Offline, use the generated data set `probunlearn.data.fictitious_authors(...)`, local TOFU files "
            "(a folder of `<split>.json`, e.g. written by `probunlearn.data.export_tofu`), "
            "or one file with `probunlearn.data.load_tofu_json(path)`."
        ) from err
    return list(hub)


def load_tofu(split: str, path: str | Path = TOFU_HUB, *, qa_per_author: int = TOFU_QA_PER_AUTHOR,
              authors: dict[str, str] | None = None):
    """One TOFU split (hub or local folder, see `tofu_records`) mapped to our schema; both go
    through the same mapping (`_from_tofu_records`). `authors`: `tofu_authors` of the full split."""
    return from_tofu_records(tofu_records(split, path), f"TOFU {split}", evaluation=split.endswith("_perturbed"),
                              qa_per_author=qa_per_author, authors=authors)


def load_tofu_json(path: str | Path):
    """A local TOFU-format file: a JSON list of records, or JSON Lines (one record a line)."""
    path = Path(path)
    return from_tofu_records(_read_records(path), str(path))
