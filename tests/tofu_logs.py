"""The real TOFU eval logs (`../shared/fixtures/tofu/`, beside the repository), read for the tests of the
text scores and of TOFU's aggregates. They were written by the TOFU code (github.com/locuslab/tofu, MIT)
for phi-1.5 fine-tuned on all authors (`phi-1.5_full`) and on retain90 (`phi-1.5_retain90`); the
tests re-derive TOFU's formulas from their raw stored fields, independently of the package, following
`aggregate_eval_stat.py` of the TOFU repository."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest


TOFU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tofu"
MODELS = ("phi-1.5_full", "phi-1.5_retain90")


FILES = (
    "eval_log.json",
    "eval_log_forget.json",
    "eval_real_author_wo_options.json",
    "eval_real_world_wo_options.json",
)


@lru_cache(maxsize=None)
def tofu_log(model: str, file: str) -> dict:
    path = TOFU_DIR / model / file
    if not path.exists():
        pytest.fail(
            f"TOFU fixture {path} is missing: the tests read the shared fixtures from "
            f"{TOFU_DIR} (a `shared/` folder beside the repository), never a copy inside it",
            pytrace=False,
        )
    return json.loads(path.read_text())
