"""Small shared helpers: seeds, profiles, the results folder, JSON I/O and the one plotting style.

Used by every notebook; settings live in the profile YAML files (`probunlearn/profiles/`).
"""

from __future__ import annotations

import json
import logging
import os
import random
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

PROFILES = ("smoke", "tofu-smoke", "cpu", "paper")
# The settings that cap the instruction set torch's kernels use (`make ... CPU_AS=avx2` sets all three):
# on an AVX-512 machine they give the timings of an AVX2-only one.
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) in one call."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard requirement in practice
        pass


def load_profile(name: str) -> dict[str, Any]:
    """Return the settings of a profile (`smoke`, `cpu`, `paper`) as a dict of UPPER_CASE names."""
    import yaml

    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    text = resources.files("probunlearn").joinpath("profiles", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def profile_path(name: str) -> Path:
    """Path of a profile's YAML file, for `papermill -f`."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return Path(str(resources.files("probunlearn").joinpath("profiles", f"{name}.yaml")))


def results_dir(profile: str, root: str | os.PathLike | None = None) -> Path:
    """`results/<profile>/`, the only channel between notebooks. `root` defaults to
    `$PROBUNLEARN_RESULTS` or `./results` (the notebooks pass `../results`)."""
    root = Path(root if root is not None else os.environ.get("PROBUNLEARN_RESULTS", "results"))
    path = root / profile
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_to_builtin))
    return path


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run the notebook that writes it first (see README, 'Notebooks')"
        )
    return json.loads(path.read_text())


def _to_builtin(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot serialise {type(x).__name__}")


def machine() -> dict[str, Any]:
    """What this machine is, for every reported time: CPU model, its vector extensions that matter
    for matrix work (AVX2, AVX-512, AVX512-BF16, AMX), whether bfloat16 is the faster dtype (AMX, or
    AVX512-BF16 measured faster, `models.bf16_speedup`; else the default dtype is float32), threads,
    and the torch version."""
    import platform

    import torch

    from probunlearn.models import cpu_bf16_measurement, cpu_has_bf16

    flags, name = set(), platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:  # not Linux: the flags stay unknown
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    # An instruction-set cap (e.g. ONEDNN_MAX_CPU_ISA=AVX2) makes an AVX-512 machine time like an AVX2-only one.
    caps = {k: os.environ[k] for k in ISA_CAPS if os.environ.get(k)}
    return {"cpu": name, "features": [f for f in wanted if f in flags], "native_bf16": cpu_has_bf16(),
            "bf16_speedup": cpu_bf16_measurement(), "isa_caps": caps,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine (`machine()`), as the reproduce engine and the benchmarks print it."""
    info = info or machine()
    measured = info.get("bf16_speedup")
    if info["native_bf16"]:
        kind = f"AVX512-BF16, bfloat16 measured {measured:.1f}x float32: bfloat16" if measured else "AMX: bfloat16"
    elif measured:
        kind = f"AVX512-BF16, bfloat16 measured {measured:.1f}x float32: float32"
    elif "avx512f" in info["features"]:
        kind = "AVX-512, no native bfloat16: float32"
    else:
        kind = "AVX2 class: float32"
    if info.get("isa_caps"):
        kind += ", capped by " + " ".join(f"{k}={v}" for k, v in info["isa_caps"].items())
    gpu = f", GPU {info['cuda']}" if info["cuda"] else ""
    return (f"{info['cpu']} ({', '.join(info['features']) or 'no AVX2'}; {kind}), {info['threads']} threads, "
            f"torch {info['torch']}{gpu}")


class _BnbNotices:
    """A logging filter that drops two bitsandbytes notices a reader cannot act on: LLM.int8's
    per-call notice that it casts float32 inputs to float16 (that is how the 8-bit product works),
    and, on CPUs with AVX512-BF16, that its optional kernel could not be fetched from the Hugging Face
    hub (offline here; its plain kernels run instead)."""

    NOTICES = ("MatMul8bitLt: inputs will be cast", "Failed to load CPU gemm_4bit_forward from kernels-community")

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.NOTICES)


def quiet_bitsandbytes() -> None:
    """Install `_BnbNotices` on the loggers that emit them. `import probunlearn` does it, because peft
    imports bitsandbytes when it is installed, and its CPU backend logs the kernel notice on import.
    While the hub is offline, `import_bitsandbytes_offline` also runs: it stops the kernel lookup."""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BnbNotices) for f in logger.filters):
            logger.addFilter(_BnbNotices())
    import_bitsandbytes_offline()


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE), as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def import_bitsandbytes_offline() -> bool:
    """Import bitsandbytes without its kernel-hub lookup, if the hub is offline and bitsandbytes is
    installed but not imported yet; returns whether it imported it here.

    Why: on a CPU with AVX512-BF16, importing bitsandbytes (peft does) runs its CPU backend, which
    asks the Hugging Face kernel hub for a fused 4-bit product: `kernels.get_kernel(
    "kernels-community/quantization-bitsandbytes")`. Offline that cannot succeed. kernels >= 0.19
    warns first that it skips the publisher's trust check, then finds no download, and bitsandbytes
    falls back to its own kernels. Here `kernels` cannot be imported while bitsandbytes is imported,
    so it falls back at once, without asking. Afterwards `kernels` is importable again (transformers
    uses it). Online, nothing changes: the hub may serve the kernel."""
    import importlib.util
    import sys

    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None or not hub_offline():
        return False
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
    try:
        import bitsandbytes  # noqa: F401
    finally:
        if kernels is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
    return True


def set_style() -> None:
    """The one plotting style of the project: seaborn, colour-blind palette, readable fonts."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind", font_scale=1.05)


def savefig(fig, name: str, folder: str | os.PathLike) -> list[Path]:
    """Save `fig` as `<folder>/<name>.png` and `.pdf`; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def save_table(df, name: str, folder: str | os.PathLike) -> list[Path]:
    """Save a pandas DataFrame as `<name>.csv` and `<name>.md`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.csv", folder / f"{name}.md"]
    df.to_csv(paths[0], index=False)
    paths[1].write_text(df.to_markdown(index=False, floatfmt=".3f") + "\n")
    return paths
