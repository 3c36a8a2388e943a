"""The environment the suite runs in: the lock of the tested set (requirements.lock, `make setup`), the
conda file that installs the same pins, and the two library notices a reader cannot act on that are
stopped at their cause (bitsandbytes' offline kernel-hub lookup, the kernels' unencrypted transport)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def locked() -> dict[str, str]:
    """{canonical name: pinned version} of requirements.lock."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            name, pinned = line.split("==")
            pins[canonicalize_name(name)] = pinned.strip()
    return pins


def declared() -> list[Requirement]:
    """pyproject's dependencies and its dev extra (what `make setup` installs)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_the_lock_pins_every_declared_dependency_inside_its_range_and_leaves_torch_out():
    pins = locked()
    assert len(pins) > 100, "the lock holds the whole closure, not just the direct dependencies"
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared in pyproject.toml but not locked: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name], str(requirement))
    # torch is the local CPU wheel here and Colab's own there; a CUDA package in the lock would pull GBs
    assert not [n for n in pins if n == "torch" or n.startswith(("nvidia-", "cuda-", "triton"))]


@pytest.mark.locked
def test_the_installed_set_is_the_lock():
    """`make setup` installs exactly the lock (`make test-latest` deselects this test: it runs the newest set)."""
    differ = {}
    for name, pinned in locked().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = None
        if installed != pinned:
            differ[name] = (pinned, installed)
    assert not differ, f"installed versions differ from requirements.lock (locked, installed): {differ}"


def test_the_conda_file_installs_the_lock_with_python_3_11():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-r requirements.lock" in pip and "-e ." in pip
    assert "python=3.11" in environment["dependencies"]
    assert "python_version" not in LOCK.read_text(), "the lock is resolved for one CPython, 3.11"


_PROBE = """
import json, logging, sys
logging.basicConfig()
import kernels
asked = []
def get_kernel(*args, **kwargs):
    asked.append(args[0])
    raise RuntimeError("no hub here")
kernels.get_kernel = get_kernel
import probunlearn.models  # through quantization: bitsandbytes, without the lookup while the hub is offline
import bitsandbytes
import bitsandbytes.functional as F
print(json.dumps({"asked": asked, "bf16_cpu": bool(F.has_avx512bf16()),
                  "kernels_back": sys.modules.get("kernels") is kernels}))
"""


def _probe(offline: str) -> tuple[dict, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": offline}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_offline_bitsandbytes_is_imported_without_asking_the_kernel_hub():
    """On a CPU with AVX512-BF16, bitsandbytes' CPU backend asks the kernel hub for a fused 4-bit product
    as it is imported; offline, kernels >= 0.19 then warns that it skips the publisher trust check.
    `probunlearn.quantization` (which `models` imports before peft) imports bitsandbytes first, with
    `kernels` unimportable for that moment."""
    offline, stderr = _probe("1")
    assert offline["asked"] == []
    assert offline["kernels_back"], "kernels must be importable again afterwards (transformers uses it)"
    assert "trust check" not in stderr and "WARNING" not in stderr, stderr[-2000:]
    if offline["bf16_cpu"]:
        # the control: online, bitsandbytes does ask (here the stand-in hub refuses), so the probe can tell
        online, _ = _probe("0")
        assert online["asked"] == ["kernels-community/quantization-bitsandbytes"]


def test_the_notebook_kernels_talk_over_encrypted_sockets():
    """ipykernel >= 7.4 warns at every start of a kernel reached over plain TCP; `make reproduce`'s
    kernel manager asks for CurveZMQ keys (the warning's absence from a whole run is checked on the
    smoke runs' logs in test_notebook_tofu_smoke.py)."""
    import zmq

    from probunlearn.reproduce import NotebookKernelManager

    assert zmq.has("curve"), "pyzmq here is built with Curve (its wheels are)"
    assert NotebookKernelManager().transport_encryption == "auto"
    spec = json.loads(Path(sys.prefix, "share/jupyter/kernels/python3/kernel.json").read_text())
    assert "curve" in spec["metadata"]["supported_encryption"], "the kernel spec must declare Curve for 'auto'"


def test_a_notebook_kernel_is_shut_down_without_an_interrupt():
    """jupyter_client interrupts a kernel (SIGINT) before it asks it to shut down; a SIGINT that lands
    while the kernel handles a message makes it log "ERROR | KeyboardInterrupt caught in kernel".
    `make reproduce`'s kernel manager skips that interrupt, and only that one."""
    import asyncio
    import signal

    from probunlearn.reproduce import NotebookKernelManager

    async def signals_sent() -> tuple[list, list]:
        manager = NotebookKernelManager(kernel_name="python3")
        await manager.start_kernel()
        client = manager.client()
        client.start_channels()
        await client.wait_for_ready(timeout=120)  # an interrupt during start-up would stop the kernel itself
        sent, send = [], manager.provisioner.send_signal

        async def record(signum):
            sent.append(signum)
            await send(signum)

        manager.provisioner.send_signal = record
        await manager.interrupt_kernel()  # asked for by itself: it goes through
        asked = list(sent)
        await manager.shutdown_kernel()
        client.stop_channels()
        return asked, sent[len(asked):]

    asked, at_shutdown = asyncio.run(signals_sent())
    assert asked == [signal.SIGINT]
    assert signal.SIGINT not in at_shutdown
