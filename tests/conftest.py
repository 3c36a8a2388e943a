"""Shared test fixtures. The papermill run of all notebooks happens once per session and profile (smoke
and tofu-smoke, temporary results and figures folders) and every `test_notebook_*.py` asserts on what it
recorded."""

from __future__ import annotations

import json
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


def pytest_collection_modifyitems(items):
    """Every test that reads the papermill runs of the notebooks carries the `notebooks` marker, so that
    `make test-fast` (`pytest -m "not notebooks"`) leaves them out."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        runs = [v for v in params.values() if isinstance(v, str) and v in ("smoke_run", "tofu_smoke_run")]
        if "_profile_runs" in getattr(item, "fixturenames", ()) or runs:  # the latter via request.getfixturevalue
            item.add_marker(pytest.mark.notebooks)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-model tests: one torch thread avoids thread start-up and contention costs on
    a busy 2-core machine (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama ("the target", tests/tiny_lm.py), in memory and saved like a model directory:
    the model of the tests of unlearning, its objectives, control and evaluation."""
    from tiny_lm import tiny_model, tiny_tokenizer

    tokenizer, model = tiny_tokenizer(), tiny_model()
    path = tmp_path_factory.mktemp("tiny_target")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"model": model, "tokenizer": tokenizer, "path": path}


# The notebook runs of both profiles start together, each in its own process with one thread per kernel:
# on 2 cores two single-threaded runs of these small workloads finish sooner than one after the other.
RUN_PROFILES = ("smoke", "tofu-smoke")
# The smoke run starts with notebook 05 alone in its empty results folder (as a Colab badge opens it):
# it builds notebooks 01-03's results itself (`reproduce.ensure_inputs`); the full run after it finds
# them, and 05's, up to date and runs 04, 06 and 07.
LONE_NOTEBOOK = {"smoke": "05"}


@pytest.fixture(scope="session")
def _profile_runs(tmp_path_factory):
    """Execute every notebook in order on each of `RUN_PROFILES`, with the engine of `make reproduce`
    (`python -m probunlearn.reproduce`, temporary results and figures folders), the profiles side by
    side; returns {profile: {'results', 'figures', 'executed', 'seconds'}}."""
    import shlex
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started, runs = time.perf_counter(), {}
    for profile in RUN_PROFILES:
        out = tmp_path_factory.mktemp(profile)
        log = (out / "reproduce.log").open("w")
        command = [sys.executable, "-m", "probunlearn.reproduce", "--profile", profile, "--results-root",
                   str(out / "results"), "--figures-dir", str(out / "figures")]
        if profile in LONE_NOTEBOOK:
            command = ["bash", "-c", f"{shlex.join(command + ['--only', LONE_NOTEBOOK[profile]])} && {shlex.join(command)}"]
        runs[profile] = (out, log, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    results = {}
    for profile, (out, log, process) in runs.items():
        process.wait()
        log.close()
        if process.returncode:
            tail = (out / "reproduce.log").read_text()[-6000:]
            pytest.fail(f"the {profile} notebooks failed (log: {out / 'reproduce.log'}):\n{tail}", pytrace=False)
        executed = out / "results" / profile / "executed"
        notebooks = sorted(executed.glob("*.ipynb"))
        seconds = {nb.stem: json.loads((executed / f"{nb.stem}.done.json").read_text())["seconds"] for nb in notebooks}
        print(f"{profile}: notebook wall times (s):", {k: round(v, 1) for k, v in seconds.items()})
        results[profile] = {"results": out / "results" / profile, "figures": out / "figures",
                            "executed": {nb.stem: nb for nb in notebooks}, "seconds": seconds,
                            "log": out / "reproduce.log"}
    print(f"notebooks of {', '.join(RUN_PROFILES)}: {time.perf_counter() - started:.0f} s side by side")
    return results


@pytest.fixture(scope="session")
def smoke_run(_profile_runs):
    """Every notebook on the smoke profile (generated data, plain weights)."""
    return _profile_runs["smoke"]


@pytest.fixture(scope="session")
def tofu_smoke_run(_profile_runs):
    """Every notebook on the tofu-smoke profile: the paper profile's code paths (TOFU-format files read
    from disk, 4-bit QLoRA) at smoke sizes."""
    return _profile_runs["tofu-smoke"]
