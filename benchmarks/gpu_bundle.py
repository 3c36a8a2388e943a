"""What a bare GPU machine needs to run `benchmarks/gpu_check.py --notebooks`, gathered here in
`gpu-bundle/` (git-ignored), with the command to run there.

The lent GPU machines (the `device` tool; `/work/.library/device/KINDS.md`) run an image with
Python 3.12, a CUDA 13 build of torch, transformers 5.17, peft, accelerate, numpy, scipy, pandas,
matplotlib and seaborn, and cannot download anything. This project needs transformers >= 5.19, and
its notebooks need papermill, a Jupyter kernel, datasets and rouge-score. The bundle holds:

- `wheels/`: this project's lock's versions (requirements.lock) of the packages in `CARRY`, for
  CPython 3.12 on manylinux x86_64 (rouge-score has no wheel on PyPI: built here, pure Python);
- `site/`: bitsandbytes unpacked with its CUDA 13 libraries only (its wheel carries every CUDA and
  ROCm build, 43 MB packed, more than the 64 MiB a call may carry leaves room for);
- `smollm2-files/`: SmolLM2-135M's config and tokenizer files (`gpu_check.py --export-files`).

It checks that every requirement of the carried packages is either carried or in `DEVICE_PACKAGES`
(the image's packages, as listed there on 2026-11-17), and that the bundle and the repository's
tracked files stay under the 64 MiB a call may carry.

    python benchmarks/gpu_bundle.py          # then run the printed command on the GPU machine, carrying gpu-bundle
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "gpu-bundle"
LIMIT = 64 * 2**20  # bytes a device call may carry, the working tree included
PYTHON = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 26, 24, 17, 5)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
# Carried at the lock's versions: newer than the image's (transformers, peft and what they need), or absent there.
CARRY = ["transformers", "peft", "huggingface-hub", "httpx2", "httpcore2", "truststore", "kernels", "tomlkit", "tokenizers", "safetensors",
         "accelerate", "datasets", "dill", "multiprocess", "fsspec", "rouge-score", "nltk", "defusedxml",
         "papermill", "nbformat", "nbclient", "jupyter-client", "jupyter-core", "traitlets", "ipykernel", "ipython",
         "ipython-pygments-lexers", "pyzmq", "tornado", "comm", "debugpy", "nest-asyncio2", "matplotlib-inline", "jedi",
         "parso", "prompt-toolkit", "wcwidth", "pexpect", "ptyprocess", "stack-data", "executing", "asttokens",
         "pure-eval", "platformdirs", "fastjsonschema", "jsonschema", "referencing", "rpds-py",
         "jsonschema-specifications", "tenacity", "entrypoints", "pyyaml", "tabulate", "tqdm"]
SDIST_ONLY = {"rouge-score"}
BNB_KEEP = re.compile(r"libbitsandbytes_(cuda13\d|cpu)\.so$")  # the image's torch is built for CUDA 13
# The image's packages ('cuda', KINDS.md, read 2026-11-17); carried ones replace theirs.
DEVICE_PACKAGES = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq
torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split())
COMMAND = ("set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           "gpu-bundle/wheels/*.whl && cp -r gpu-bundle/site/. /tmp/site/ && export PYTHONPATH=/tmp/site "
           "PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --files gpu-bundle/smollm2-files --notebooks "
           "2>&1 | tee $OUT/gpu_check.log")


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_versions(lock: Path = ROOT / "requirements.lock") -> dict[str, str]:
    pins = (re.match(r"^([A-Za-z0-9._-]+)==([^\s;]+)", line) for line in lock.read_text().splitlines())
    return {normal(m.group(1)): m.group(2) for m in pins if m}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def download(specs: list[str], folder: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp",
        *platforms, "-d", str(folder), *specs)


# The GPU machine's environment markers (PEP 508): CPython 3.12 on x86_64 Linux.
MARKERS = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def requirements(wheel: Path) -> set[str]:
    """The names a wheel requires on the GPU machine (`MARKERS`; extras left out)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    needed = (Requirement(line.removeprefix("Requires-Dist:").strip()) for line in lines
              if line.startswith("Requires-Dist:"))
    return {normal(r.name) for r in needed if r.marker is None or r.marker.evaluate(MARKERS)}


def trimmed_bitsandbytes(version: str, site: Path) -> None:
    """bitsandbytes (package and dist-info, which transformers looks for) with the CUDA 13 libraries only."""
    with tempfile.TemporaryDirectory() as folder:
        download([f"bitsandbytes=={version}"], Path(folder))
        wheel = next(Path(folder).glob("bitsandbytes-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.endswith(".so") and not BNB_KEEP.search(name):
                    continue
                archive.extract(name, site)


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tracked_size() -> int:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BUNDLE)
    args = parser.parse_args(argv)
    versions = lock_versions()
    missing = [name for name in CARRY + ["bitsandbytes"] if normal(name) not in versions]
    if missing:
        raise SystemExit(f"requirements.lock has no {', '.join(missing)}")
    if args.out.exists():
        shutil.rmtree(args.out)
    wheels, site = args.out / "wheels", args.out / "site"
    wheels.mkdir(parents=True)
    download([f"{name}=={versions[normal(name)]}" for name in CARRY if name not in SDIST_ONLY], wheels)
    for name in SDIST_ONLY:
        pip("wheel", "-q", "--no-deps", "-w", str(wheels), f"{name}=={versions[normal(name)]}")
    trimmed_bitsandbytes(versions["bitsandbytes"], site)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--export-files",
                    str(args.out / "smollm2-files")], check=True, capture_output=True)
    carried = {normal(w.name.split("-")[0]) for w in wheels.glob("*.whl")} | {"bitsandbytes"}
    unmet = {f"{w.name.split('-')[0]} needs {r}" for w in wheels.glob("*.whl") for r in requirements(w)
             if r not in carried and r not in DEVICE_PACKAGES}
    total = size(args.out) + tracked_size()
    print(f"{args.out}: {len(carried)} packages, {size(args.out) / 2**20:.1f} MiB; with the repository's tracked "
          f"files {total / 2**20:.1f} MiB of the {LIMIT / 2**20:.0f} MiB a call carries")
    if unmet:
        print("not on the GPU machine and not carried:\n  " + "\n  ".join(sorted(unmet)))
    if total > LIMIT:
        print("too large to carry")
    print(f"on the GPU machine (the device tool's run, carry ['gpu-bundle'], timeout 600 s):\n{COMMAND}")
    return 1 if unmet or total > LIMIT else 0


if __name__ == "__main__":
    sys.exit(main())
