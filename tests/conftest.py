"""Shared test fixtures. The papermill run of all notebooks happens once per session (smoke profile,
temporary results and figures folders) and every `test_notebook_*.py` asserts on what it recorded."""

from __future__ import annotations

import os
import time
from pathlib import Path

# Hermetic tests: never wait on the (unreachable) Hugging Face hub. Set before anything imports
# huggingface_hub, and inherited by the papermill kernels.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
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
    """Execute every notebook in order on the smoke profile; returns a dict with the results folder
    of the profile, the figures folder, the executed notebooks and their wall times."""
    import papermill as pm

    from probunlearn.reproduce import parameters_for

    out = tmp_path_factory.mktemp("smoke")
    executed, seconds = {}, {}
    for nb in NOTEBOOKS:
        target = out / "executed" / nb.name
        target.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        parameters = parameters_for(nb, "smoke", out / "results", out / "figures")
        pm.execute_notebook(str(nb), str(target), parameters=parameters,
                            cwd=str(nb.parent), kernel_name="python3", progress_bar=False)
        seconds[nb.stem] = time.perf_counter() - start
        executed[nb.stem] = target
    print("notebook wall times (s):", {k: round(v, 1) for k, v in seconds.items()})
    return {"results": out / "results" / "smoke", "figures": out / "figures", "executed": executed,
            "seconds": seconds}
