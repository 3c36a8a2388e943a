"""Small shared helpers: seeds, profiles, the results folder, JSON I/O and the one plotting style.

Used by every notebook; settings live in the profile YAML files (`probunlearn/profiles/`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

PROFILES = ("smoke", "tofu-smoke", "cpu", "paper")


def renamed_arguments(**renamed: str):
    """Accept the old names of keyword arguments for one release: `@renamed_arguments(lam="ed_weight")`
    passes `lam=` on as `ed_weight=`, with a DeprecationWarning that names the new one (the package
    speaks one vocabulary, SPEC.md's; notebooks and users written against the old names keep working)."""
    def wrap(function):
        @functools.wraps(function)
        def call(*args, **kwargs):
            for old, new in renamed.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{function.__name__}() got {old}= and its new name {new}=: pass {new}= only")
                    warnings.warn(f"{function.__name__}({old}=...) is deprecated: pass {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)
        return call
    return wrap


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


def cache_dir() -> Path:
    """`$PROBUNLEARN_CACHE`, default `~/.cache/probunlearn`."""
    return Path(os.environ.get("PROBUNLEARN_CACHE", Path.home() / ".cache" / "probunlearn"))


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=_to_builtin))
    return path


def existing(path: str | os.PathLike) -> Path:
    """`path`, or a FileNotFoundError saying to run the notebook that writes it first."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: run the notebook that writes it first (see README, 'Notebooks')"
        )
    return path


def load_json(path: str | os.PathLike) -> Any:
    return json.loads(existing(path).read_text())


def _to_builtin(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot serialise {type(x).__name__}")


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
    (While the hub is offline, `quantization.import_bitsandbytes_offline` stops that lookup itself.)"""
    for name in ("bitsandbytes.autograd._functions", "bitsandbytes.backends.cpu.ops"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BnbNotices) for f in logger.filters):
            logger.addFilter(_BnbNotices())


@contextlib.contextmanager
def quiet_datasets():
    """Within the block, `datasets` shows no progress bar: its bars for trivial operations ("Filter",
    "Creating json from Arrow format") would clutter every data cell of the notebooks, where a
    student should see only the bars of long work (training, sampling, evaluation)."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    enabled = not are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            enable_progress_bars()


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
