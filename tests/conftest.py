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


# The notebook runs of both profiles, two processes at a time with one thread per kernel: on 2 cores two
# single-threaded runs of these small workloads finish sooner than one after the other.
RUN_PROFILES = ("smoke", "tofu-smoke")
# The smoke run starts with notebook 05 alone in its empty results folder (as a Colab badge opens it):
# it builds notebooks 01-03's results itself (`reproduce.ensure_inputs`). Then its 04 and 06 (they read
# only 01-03's results): 04 first, on the core smoke 05 leaves, 06 on the first one free after that
# (the tofu-smoke run's, as a rule); its full run last finds 01-06 up to date and runs 07. (The tofu-smoke
# run takes about 3/4 of the smoke chain's time: with the smoke notebooks in one process, the fixture
# waited for that chain alone, 628 s against tofu-smoke's 450 s on the AVX2 stand-in, 2026-12-05.)
# The GPU check's notebooks check (benchmarks/gpu_check.py --notebooks: the smoke notebooks with MODEL a
# saved random-weight model), dry-run on notebook 01 with a 2-block model beside the last step, 07 (20 s
# in all against 07's 18 s, natively on the Zen 4; with notebook 02 too it took 38 s on the AVX2 stand-in,
# which made `make test` 20 s longer).
LONE_NOTEBOOK = {"smoke": "05"}
GPU_CHECK_NOTEBOOKS = "01"
# name: (profile, notebooks (None: all), the steps it waits for); at most two run at once, in this order
STEPS = {"smoke 05": ("smoke", [LONE_NOTEBOOK["smoke"]], ()),
         "tofu-smoke": ("tofu-smoke", None, ()),
         "smoke 04": ("smoke", ["04"], ("smoke 05",)),
         "smoke 06": ("smoke", ["06"], ("smoke 05",)),
         "gpu-check": ("gpu-check", None, ("tofu-smoke",)),
         "smoke": ("smoke", None, ("smoke 04", "smoke 06"))}


@pytest.fixture(scope="session")
def _profile_runs(tmp_path_factory):
    """Execute every notebook in order on each of `RUN_PROFILES`, with the engine of `make reproduce`
    (`python -m probunlearn.reproduce`, temporary results and figures folders), as `STEPS` above
    schedule them, two at a time; returns {profile: {'results', 'figures', 'executed', 'seconds',
    'log'}}, and {'gpu-check': {'log'}}: the GPU check's notebooks check, dry-run."""
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    outs = {profile: tmp_path_factory.mktemp(profile) for profile in (*RUN_PROFILES, "gpu-check")}

    def start(profile, only):
        out = outs[profile]
        command = [sys.executable, "-m", "probunlearn.reproduce", "--profile", profile, "--results-root",
                   str(out / "results"), "--figures-dir", str(out / "figures")] + (["--only", *only] if only else [])
        if profile == "gpu-check":
            command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                       "--notebooks", GPU_CHECK_NOTEBOOKS, "--notebooks-only"]
        with (out / "reproduce.log").open("a") as log:  # the child keeps its own handle
            return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    running, done = {}, set()
    while len(done) < len(STEPS):
        for name, (profile, only, after) in STEPS.items():
            if name not in running and name not in done and len(running) < 2 and set(after) <= done:
                running[name] = start(profile, only)
        time.sleep(0.5)
        for name, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            if process.returncode:
                for other in running.values():
                    other.kill()
                log = outs[STEPS[name][0]] / "reproduce.log"
                pytest.fail(f"the {name} notebooks failed (log: {log}):\n{log.read_text()[-6000:]}", pytrace=False)
            done.add(name)
    results = {}
    for profile, out in outs.items():
        executed = out / "results" / profile / "executed"
        notebooks = sorted(executed.glob("*.ipynb"))
        seconds = {nb.stem: json.loads((executed / f"{nb.stem}.done.json").read_text())["seconds"] for nb in notebooks}
        print(f"{profile}: notebook wall times (s):", {k: round(v, 1) for k, v in seconds.items()})
        results[profile] = {"results": out / "results" / profile, "figures": out / "figures",
                            "executed": {nb.stem: nb for nb in notebooks}, "seconds": seconds,
                            "log": out / "reproduce.log"}
    results["gpu-check"] = {"log": outs["gpu-check"] / "reproduce.log"}
    print(f"notebooks of {', '.join(RUN_PROFILES)} and the GPU check's: {time.perf_counter() - started:.0f} s, "
          "two runs at a time")
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
