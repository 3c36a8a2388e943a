"""Shared test fixtures. The papermill run of all notebooks happens once per session (smoke profile,
temporary results and figures folders) and every `test_notebook_*.py` asserts on what it recorded."""

from __future__ import annotations

import os
from pathlib import Path

# Hermetic tests: never wait on the (unreachable) Hugging Face hub. Set before anything imports
# huggingface_hub, and inherited by the papermill kernels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from probunlearn.reproduce import notebooks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = notebooks(ROOT / "notebooks")
TOFU_FIXTURES = ROOT.parent / "shared" / "fixtures" / "tofu"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-model tests: one torch thread avoids thread start-up and contention costs on
    a busy 2-core machine (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Execute every notebook in order on the smoke profile, with the engine of `make reproduce`
    (temporary results and figures folders); returns a dict with the results folder of the
    profile, the figures folder, the executed notebooks and their wall times."""
    from probunlearn.reproduce import run

    out = tmp_path_factory.mktemp("smoke")
    report = run("smoke", results_root=out / "results", figures_dir=out / "figures", notebook_dir=ROOT / "notebooks",
                 progress=False)
    results = out / "results" / "smoke"
    seconds = {Path(name).stem: r["seconds"] for name, r in report.items()}
    print("notebook wall times (s):", {k: round(v, 1) for k, v in seconds.items()})
    return {"results": results, "figures": out / "figures", "executed": {Path(n).stem: results / "executed" / n
                                                                        for n in report},
            "seconds": seconds}
