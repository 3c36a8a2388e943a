"""The one-shot GPU check (benchmarks/gpu_check.py), dry-run on this CPU with 2-block models of
SmolLM2's, phi-1.5's and Llama-3.2-1B's shapes: every check runs and passes, one line each (the
memory and speed comparisons only judge on a GPU)."""

import importlib.util

from conftest import GPU_CHECK_NOTEBOOKS, ROOT


def test_gpu_check_dry_run_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--small"]) == 0
    out = capsys.readouterr().out
    checks = [line.split()[1] for line in out.splitlines() if line.startswith("check ")]
    assert checks == ["setup", "finetune", "qlora_ga", "qlora_npo", "qlora_ga_eo", "float16", "load_model", "frozen_trunk",
                      "sampler_exact", "sampler_batch", "batch_changes", "speed", "memory_phi-1.5",
                      "memory_Llama-3.2-1B"]
    assert "FAIL" not in out and "14 of 14 checks ok" in out


def test_gpu_check_runs_the_smoke_notebooks_with_a_saved_random_model(_profile_runs):
    """`--notebooks`: papermill runs the smoke notebooks with MODEL the random-weight model saved as a
    folder, each must finish and leave what the next one reads (here notebook 01 alone with the 2-block
    model, in the background beside the smoke runs, `conftest.STEPS`: the check's papermill run, its
    parameters and kernel; loading a saved model folder is `load_model`'s check above, and notebooks
    01-05 ran this way by hand in 115 s)."""
    out = _profile_runs["gpu-check"]["log"].read_text()
    line = next(l for l in out.splitlines() if l.startswith("check notebooks"))
    assert " ok " in line and "MODEL = the random-weight model, on cpu" in line
    for number in GPU_CHECK_NOTEBOOKS.split(","):
        assert f" {number} " in line and "FAILED" not in line
    assert "1 of 1 check ok" in out
