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


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-model tests: one torch thread avoids thread start-up and contention costs on
    a busy 2-core machine (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The notebook runs of both profiles start as soon as the tests are collected, each in its own process
# with one thread per kernel, and the unit tests run meanwhile on one thread: on 2 cores, single-threaded
# runs of these small workloads side by side finish sooner than one after the other.
RUN_FIXTURES = {"smoke": "smoke_run", "tofu-smoke": "tofu_smoke_run"}
_started: dict = {}  # profile -> (folder, log file, process)


def _start(profile: str, tmp_path_factory) -> None:
    import subprocess
    import sys

    out = tmp_path_factory.mktemp(profile)
    log = (out / "reproduce.log").open("w")
    command = [sys.executable, "-m", "probunlearn.reproduce", "--profile", profile, "--results-root",
               str(out / "results"), "--figures-dir", str(out / "figures")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    _started[profile] = (out, log, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))


def pytest_collection_modifyitems(session, config, items):
    """Start the notebook runs that the collected tests need, before the first test runs."""
    wanted = [p for p, fixture in RUN_FIXTURES.items() if any(fixture in item.fixturenames for item in items)]
    if wanted:
        import torch

        torch.set_num_threads(1)  # the unit tests share the 2 cores with the notebook runs
        for profile in wanted:
            _start(profile, config._tmp_path_factory)


def pytest_sessionfinish(session, exitstatus):
    """A run nobody waited for (tests deselected, or the session stopped early) ends with the session."""
    for _, log, process in _started.values():
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _finished_run(profile: str, tmp_path_factory) -> dict:
    """Wait for `profile`'s notebook run (`python -m probunlearn.reproduce`, the engine of `make
    reproduce`, temporary results and figures folders); returns {'results', 'figures', 'executed',
    'seconds'}."""
    if profile not in _started:
        _start(profile, tmp_path_factory)
    out, log, process = _started[profile]
    process.wait()
    log.close()
    if process.returncode:
        tail = (out / "reproduce.log").read_text()[-6000:]
        pytest.fail(f"the {profile} notebooks failed (log: {out / 'reproduce.log'}):\n{tail}", pytrace=False)
    executed = out / "results" / profile / "executed"
    notebooks = sorted(executed.glob("*.ipynb"))
    seconds = {nb.stem: json.loads((executed / f"{nb.stem}.done.json").read_text())["seconds"] for nb in notebooks}
    print(f"{profile}: notebook wall times (s):", {k: round(v, 1) for k, v in seconds.items()})
    return {"results": out / "results" / profile, "figures": out / "figures",
            "executed": {nb.stem: nb for nb in notebooks}, "seconds": seconds}


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """Every notebook on the smoke profile (generated data, plain weights)."""
    return _finished_run("smoke", tmp_path_factory)


@pytest.fixture(scope="session")
def tofu_smoke_run(tmp_path_factory):
    """Every notebook on the tofu-smoke profile: the paper profile's code paths (TOFU-format files read
    from disk, 4-bit QLoRA) at smoke sizes."""
    return _finished_run("tofu-smoke", tmp_path_factory)
