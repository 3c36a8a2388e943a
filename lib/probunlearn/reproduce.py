"""`python -m probunlearn.reproduce --profile cpu` (what `make reproduce` runs): every notebook in
order with papermill, then the time per notebook.

- Executed notebooks go to `results/<profile>/executed/`, with papermill's progress bar per cell.
- **Resumes.** A notebook that finished writes a stamp `executed/<name>.done.json` holding a key: a
  hash of the notebook, the settings it was given, the package's source, and the key of the
  notebook before it. A later run skips every notebook whose key is unchanged, so after an
  interruption finished work is not redone, while a changed setting, notebook or library reruns
  that notebook and everything after it (notebook 02 also reuses its fine-tuned adapters when
  their settings and data are unchanged). `--force` reruns everything.
- Notebook 07 writes every figure and table into `figures/` for the main (cpu) profile, and into
  `results/<profile>/figures_final/` for the others, so `figures/` only ever holds the cpu run.
- **Sizes for a slow CPU.** A profile may name `SLOW_CPU_SIZES`, settings that replace its own on a
  CPU whose matrix-product rate (`hardware.matrix_gflops`, in the dtype the run uses) is below
  `SLOW_CPU_GFLOPS`, so that the run keeps its time budget there (`--sizes auto`, the default;
  `--sizes full` or `slow` chooses). The run prints the rate and every changed setting, and each
  notebook that reads one receives them in `SIZES_NOTE` and prints it; the executed notebooks
  record the settings they ran with.
- **A notebook alone** (`ensure_inputs`, the first thing notebooks 02-07 do). A notebook opened on
  its own (a Colab badge starts a fresh machine; a student who skipped ahead) finds the results of
  the notebooks it reads missing, and builds them by running those notebooks headlessly with this
  engine, at its own profile, with the expected time and a progress bar. On Colab the results can
  live on Google Drive (`colab_folders`), so that the next notebook's runtime finds them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import zmq
from jupyter_client import AsyncKernelManager
from traitlets import default

from probunlearn.hardware import default_dtype, describe_machine, matrix_gflops
from probunlearn.results import ARTEFACTS
from probunlearn.utils import PROFILES, load_profile, results_dir
from probunlearn.vllm_backend import vllm_available

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(__file__).resolve().parent
COLAB_CLONE = Path("/content/probunlearn")  # where a notebook's first cell clones the repository on Colab


def notebook_folder() -> Path:
    """The repository's notebooks/: beside the package's source (a clone, or an editable install), or,
    for a package installed from a clone (on Colab, the first cell's), in that clone (`COLAB_CLONE`)."""
    for folder in (ROOT / "notebooks", COLAB_CLONE / "notebooks"):
        if folder.is_dir():
            return folder
    return ROOT / "notebooks"


def notebooks(folder: Path | None = None) -> list[Path]:
    """The numbered notebooks of `folder` (default: `notebook_folder()`), in the order they run."""
    return sorted(Path(folder or notebook_folder()).glob("[0-9][0-9]_*.ipynb"))


SIZES = ("auto", "full", "slow")


def slow_cpu_sizes(settings: dict, sizes: str = "auto", rate: float | None = None) -> tuple[dict, str]:
    """(changed settings, why) for a run of a profile with `settings`: the profile's `SLOW_CPU_SIZES`
    when `sizes` is "slow", or "auto" on a CPU (no GPU) whose matrix rate (`rate`, default measured
    by `hardware.matrix_gflops`) is below the profile's `SLOW_CPU_GFLOPS`; else ({}, why)."""
    if sizes not in SIZES:
        raise ValueError(f"sizes must be one of {', '.join(SIZES)}, got {sizes!r}")
    slow = dict(settings.get("SLOW_CPU_SIZES") or {})
    unknown = sorted(set(slow) - set(settings))
    if unknown:
        raise ValueError(f"SLOW_CPU_SIZES of profile {settings.get('PROFILE')!r} names settings the profile "
                         f"does not have: {', '.join(unknown)}")
    if not slow:
        return {}, "this profile has no slow-CPU sizes"
    if sizes == "full":
        return {}, "full sizes (--sizes full)"
    if sizes == "slow":
        return slow, "slow-CPU sizes chosen (--sizes slow)"
    import torch

    if torch.cuda.is_available():
        return {}, "full sizes: a GPU is present"
    dtype = default_dtype("cpu")
    rate = matrix_gflops(dtype) if rate is None else rate
    threshold = float(settings["SLOW_CPU_GFLOPS"])
    name = str(dtype).removeprefix("torch.")
    if rate >= threshold:
        return {}, f"full sizes: matrix products run at {rate:.0f} GFLOP/s in {name} here (slow-CPU sizes below {threshold:.0f})"
    return slow, (f"slow-CPU sizes: matrix products run at {rate:.0f} GFLOP/s in {name} here, below this profile's "
                  f"SLOW_CPU_GFLOPS of {threshold:.0f}, so the run keeps its time budget with smaller sizes "
                  f"(`--sizes full` runs the full ones)")


class NotebookKernelManager(AsyncKernelManager):
    """The kernel manager of the notebooks' kernels (papermill's `kernel_manager_class`). It differs
    from jupyter_client's in two defaults:

    - it gives each kernel CurveZMQ keys (`transport_encryption="auto"`; the kernel spec that
      `ipykernel install` writes declares Curve support), so that the kernel and papermill talk over
      encrypted sockets. Without them ipykernel >= 7.4 warns at every start that the kernel "is running
      over TCP without encryption". Where pyzmq lacks Curve, the kernels run as before;
    - it shuts a kernel down without interrupting it first. jupyter_client sends SIGINT before every
      shutdown request, to stop code that still runs; after a notebook's last cell nothing runs, and a
      SIGINT that lands while the kernel finishes handling a message makes it log "ERROR |
      KeyboardInterrupt caught in kernel". An interrupt asked for outside a shutdown still goes through.
    """

    @default("transport_encryption")
    def _encrypt_where_pyzmq_can(self) -> str:
        return "auto" if zmq.has("curve") else "disabled"

    async def _async_interrupt_kernel(self) -> None:
        if not self.shutting_down:
            await super()._async_interrupt_kernel()


def parameters_for(notebook: Path, profile: str, results_root: Path, figures_dir: Path,
                   changed: dict | None = None, why: str = "") -> dict:
    """The profile's settings that `notebook` declares in its parameters cell, plus the folders;
    `changed` (from `slow_cpu_sizes`) replaces some of them, and a notebook that reads a changed
    setting gets `SIZES_NOTE`, a line saying which and why (it must declare SIZES_NOTE)."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    profile_settings = load_profile(profile)
    settings = {**profile_settings, **(changed or {}), "RESULTS_ROOT": str(results_root), "FIGURES_DIR": str(figures_dir)}
    parameters = {k: v for k, v in settings.items() if k in declared}
    mine = [k for k in (changed or {}) if k in declared]
    if mine:
        if "SIZES_NOTE" not in declared:
            raise ValueError(f"{notebook.name} reads {', '.join(mine)}, which this run changes, but does not "
                             "declare SIZES_NOTE to say so")
        parameters["SIZES_NOTE"] = f"{why}: " + "; ".join(
            f"{k} {profile_settings[k]!r} -> {changed[k]!r}" for k in mine)
    return parameters


def source_hash() -> str:
    """Hash of the package's code: results depend on it too. (Profiles are not hashed: the settings a
    notebook receives are part of its key, so editing one setting reruns only the notebooks that read it.)"""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def run_key(notebook: Path, parameters: dict, previous_key: str, code: str) -> str:
    """The cache key of one notebook run (see the module docstring). `SIZES_NOTE` is left out: it
    reports the matrix rate measured on the day (which moves by a few percent between runs), and the
    settings it names are in the parameters themselves."""
    digest = hashlib.sha256()
    digest.update(notebook.read_bytes())
    kept = {k: v for k, v in parameters.items() if k != "SIZES_NOTE"}
    digest.update(json.dumps(kept, sort_keys=True, default=str).encode())
    digest.update(previous_key.encode() + code.encode())
    return digest.hexdigest()


def check_sampler(settings: dict) -> None:
    """Fail before the first notebook, not hours later in 05, when the profile samples with vLLM
    (`SAMPLER: vllm`) and this environment has no vLLM."""
    if settings.get("SAMPLER", "ours") == "vllm" and not vllm_available():
        raise SystemExit(f"profile {settings.get('PROFILE')!r} samples with vLLM (SAMPLER: vllm), which is not installed "
                         "here. vLLM needs an environment of its own (its transformers pin clashes with ours): "
                         "`make vllm VLLM_PACKAGE=vllm==0.33.0` on a GPU machine, then run "
                         "`.venv-vllm/bin/python -m probunlearn.reproduce --profile ...`; or set SAMPLER: ours.")


def default_figures_dir(profile: str, results_root: Path) -> Path:
    return ROOT / "figures" if profile == "cpu" else results_dir(profile, results_root) / "figures_final"


def run(profile: str = "cpu", only: list[str] | None = None, results_root: Path | None = None,
        figures_dir: Path | None = None, force: bool = False, progress: bool = True,
        notebook_dir: Path | None = None, sizes: str = "auto") -> dict[str, dict]:
    """Run the notebooks of `notebook_dir` (default: notebooks/; all, or those whose names start
    with one of `only`) in order; returns {notebook name: {'seconds', 'cached'}}. `sizes`: see
    `slow_cpu_sizes`."""
    import papermill as pm

    results_root = Path(results_root or ROOT / "results")
    figures_dir = Path(figures_dir or default_figures_dir(profile, results_root))
    executed = results_dir(profile, results_root) / "executed"
    executed.mkdir(parents=True, exist_ok=True)
    code = source_hash()
    todo = notebooks(notebook_dir)
    chosen = [nb for nb in todo if not only or any(nb.name.startswith(o) for o in only)]
    settings = load_profile(profile)
    check_sampler(settings)
    report: dict[str, dict] = {}
    previous_key = ""
    print(f"machine: {describe_machine()}", flush=True)
    changed, why = slow_cpu_sizes(settings, sizes)
    print(why + "".join(f"\n  {k}: {settings[k]!r} -> {v!r}" for k, v in changed.items()), flush=True)
    for i, nb in enumerate(todo, 1):
        parameters = parameters_for(nb, profile, results_root, figures_dir, changed, why)
        key = run_key(nb, parameters, previous_key, code)
        previous_key = key
        if nb not in chosen:
            continue
        stamp = executed / f"{nb.stem}.done.json"
        done = json.loads(stamp.read_text()) if stamp.exists() else {}
        if not force and done.get("key") == key and (executed / nb.name).exists():
            print(f"[{i}/{len(todo)}] {nb.name}: up to date (took {done['seconds'] / 60:.1f} min), skipped", flush=True)
            report[nb.name] = {"seconds": done["seconds"], "cached": True}
            continue
        stamp.unlink(missing_ok=True)
        print(f"[{i}/{len(todo)}] {nb.name} (profile {profile})", flush=True)
        start = time.perf_counter()
        pm.execute_notebook(str(nb), str(executed / nb.name), parameters=parameters, cwd=str(nb.parent),
                            kernel_name="python3", progress_bar=progress,
                            kernel_manager_class=NotebookKernelManager)
        seconds = time.perf_counter() - start
        stamp.write_text(json.dumps({"key": key, "seconds": seconds, "profile": profile,
                                     "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "changed_settings": {k: v for k, v in changed.items() if k in parameters}},
                                    indent=1))
        report[nb.name] = {"seconds": seconds, "cached": False}
    print("\nwall time per notebook:")
    for name, r in report.items():
        print(f"  {name:<40} {r['seconds'] / 60:6.1f} min" + ("  (earlier run, skipped now)" if r["cached"] else ""))
    ran = sum(r["seconds"] for r in report.values() if not r["cached"])
    print(f"  {'total of this run':<40} {ran / 60:6.1f} min;  all notebooks: "
          f"{sum(r['seconds'] for r in report.values()) / 60:.1f} min")
    print(f"figures and tables: {figures_dir}")
    return report


# ----------------------------------------------------------------------------- a notebook on its own
# The notebooks whose results each notebook reads (by number), and what each leaves last in the
# results folder, whether the engine or a person ran it: the sign that it finished.
NEEDS = {"01": (), "02": ("01",), "03": ("01", "02"), "04": ("01", "02", "03"), "05": ("01", "02", "03"),
         "06": ("01", "02", "03"), "07": ("01", "02", "03", "04", "05", "06")}
FINISHED = {"01": "data/stats.json", "02": ARTEFACTS["finetune_summary"], "03": ARTEFACTS["unlearning_summary"],
            "04": ARTEFACTS["entropy_summary"], "05": ARTEFACTS["probabilistic_summary"],
            "06": ARTEFACTS["attacks_summary"]}
# Minutes per notebook, measured (what `ensure_inputs` announces), on a 2-core AMD EPYC Zen 4 in
# bfloat16: smoke from `make test` of 2026-12-06 (one thread, beside the tofu-smoke run; its sizes of
# that day), cpu from a fresh clone's `make reproduce` of 2026-12-07 (f8fbdf3, 58.1 min). An AVX2-only CPU
# takes longer (notebook 03: 19.8 min on the AVX2 stand-in even at the slow-CPU sizes); the paper profile has
# no measured times (no GPU has run it).
EXPECTED_MINUTES = {
    "smoke": {"01": 0.2, "02": 1.1, "03": 1.3, "04": 2.3, "05": 1.3, "06": 0.8, "07": 0.3},
    "cpu": {"01": 0.1, "02": 5.3, "03": 14.9, "04": 11.7, "05": 18.7, "06": 7.1, "07": 0.2},
}
DRIVE_FOLDER = Path("/content/drive/MyDrive/probunlearn")  # results/ and figures/ on a mounted Google Drive


def on_colab() -> bool:
    return "google.colab" in sys.modules


def colab_folders(results_root: str | os.PathLike, figures_dir: str | os.PathLike, *,
                  drive: bool = True) -> tuple[str, str]:
    """Where a notebook keeps `results/` and `figures/`: as given, except on Colab (whose working
    folder is /content): on Google Drive (`DRIVE_FOLDER`) when `drive` and Drive is mounted, so that a
    notebook opened later from its own badge, on a fresh runtime, finds the earlier results there;
    else in the repository's clone (lost with the runtime)."""
    if not on_colab():
        return str(results_root), str(figures_dir)
    root = DRIVE_FOLDER if drive and DRIVE_FOLDER.parent.exists() else COLAB_CLONE
    (root / "results").mkdir(parents=True, exist_ok=True)
    print(f"results and figures: {root} ({'Google Drive' if root == DRIVE_FOLDER else 'this runtime only'})")
    return str(root / "results"), str(root / "figures")


def missing_inputs(notebook: str, profile: str, results_root: str | os.PathLike) -> list[str]:
    """The numbers of the notebooks that `notebook` ("05", or a name starting with it) reads and that
    have not finished for `profile` in `results_root` (`FINISHED`), with every notebook after the
    first missing one that it also reads (their results depend on it)."""
    number = Path(str(notebook)).name[:2]
    if number not in NEEDS:
        raise ValueError(f"no notebook {notebook!r}: expected one of {', '.join(NEEDS)}")
    results = Path(results_root) / profile
    needed = NEEDS[number]
    first = next((i for i, n in enumerate(needed) if not (results / FINISHED[n]).exists()), None)
    return [] if first is None else list(needed[first:])


def ensure_inputs(notebook: str, profile: str, results_root: str | os.PathLike, *, figures_dir=None,
                  sizes: str = "auto", build: bool = True) -> Path:
    """Check that the results `notebook` reads are there for `profile`, and build the missing ones by
    running the notebooks that write them (`run`, the engine of `make reproduce`: the same settings,
    so a later `make reproduce` keeps them), with the expected time and a progress bar. Returns the
    results folder, `results_root/<profile>`. `build=False` raises instead, naming the notebooks to run."""
    from tqdm.auto import tqdm

    results_root = Path(results_root).resolve()  # the engine's own form, so `make reproduce` keeps what this builds
    figures_dir = Path(figures_dir).resolve() if figures_dir is not None else None
    missing = missing_inputs(notebook, profile, results_root)
    results = results_dir(profile, results_root)
    if not missing:
        return results
    names = {nb.name[:2]: nb.stem for nb in notebooks()}
    if not names:
        raise FileNotFoundError(f"{notebook_folder()} has no notebooks to build the inputs with: install the "
                                "package from a clone of the repository (on Colab, the first cell does)")
    listed = ", ".join(names[n] for n in missing)
    if not build:
        raise FileNotFoundError(f"{results} lacks what notebooks {listed} write: run them first (profile {profile})")
    minutes = EXPECTED_MINUTES.get(profile, {})
    expected = (f"about {sum(minutes[n] for n in missing):.0f} min on a 2-core CPU"
                if all(n in minutes for n in missing) else "no measured time for this profile")
    print(f"{Path(str(notebook)).name[:2]} reads what notebooks {listed} write, and {results} lacks it: running "
          f"them now on profile {profile} ({expected}; once: later notebooks find them there)", flush=True)
    bar = tqdm(total=sum(minutes.get(n, 1.0) for n in missing), desc="building inputs", unit="min",
               bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} expected min [{elapsed}]")
    for number in missing:
        bar.set_postfix_str(names[number])
        run(profile, only=[number], results_root=results_root, figures_dir=figures_dir, sizes=sizes, progress=False)
        bar.update(minutes.get(number, 1.0))
    bar.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", choices=PROFILES)
    parser.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 04 05 06")
    parser.add_argument("--force", action="store_true", help="rerun notebooks even when their results are up to date")
    parser.add_argument("--results-root", type=Path, help="default: results/ in the repository")
    parser.add_argument("--figures-dir", type=Path, help="default: figures/ (cpu) or results/<profile>/figures_final/")
    parser.add_argument("--sizes", default="auto", choices=SIZES,
                        help="auto: the profile's slow-CPU sizes where this CPU's matrix products are slow; full; slow")
    args = parser.parse_args(argv)
    run(args.profile, args.only, results_root=args.results_root, figures_dir=args.figures_dir, force=args.force,
        sizes=args.sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
