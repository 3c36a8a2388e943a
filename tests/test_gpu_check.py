"""The one-shot GPU check (benchmarks/gpu_check.py), dry-run on this CPU with a 2-block model of
SmolLM2's shape: every check runs and passes, one line each."""

import importlib.util

from conftest import ROOT


def test_gpu_check_dry_run_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.main(["--device", "cpu", "--small"]) == 0
    out = capsys.readouterr().out
    checks = [line.split()[1] for line in out.splitlines() if line.startswith("check ")]
    assert checks == ["setup", "finetune", "qlora_ga", "qlora_npo", "sampler_exact", "sampler_batch", "speed"]
    assert "FAIL" not in out and "7 of 7 checks ok" in out
