"""What `benchmarks/gpu_bundle.py` gathers for a bare GPU machine: every carried package at a version
the lock pins, requirements read under that machine's environment markers, bitsandbytes cut to its
CUDA 13 libraries. (Gathering itself downloads 51 MiB and runs by hand.)"""

import importlib.util
import zipfile

from conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_bundle", ROOT / "benchmarks" / "gpu_bundle.py")
gpu_bundle = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_bundle)


def test_every_carried_package_is_pinned_by_the_lock():
    versions = gpu_bundle.lock_versions()
    assert versions["transformers"] and versions["bitsandbytes"]
    assert [name for name in gpu_bundle.CARRY if gpu_bundle.normal(name) not in versions] == []


def test_requirements_are_read_under_the_gpu_machines_markers(tmp_path):
    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    metadata = "\n".join(["Metadata-Version: 2.1", "Name: demo", "Version: 1.0",
                          "Requires-Dist: Plain_Name>=1", "Requires-Dist: linux-only; sys_platform != 'emscripten'",
                          "Requires-Dist: old-python; python_version < \"3.11\"", "Requires-Dist: mac; platform_system == 'Darwin'",
                          "Requires-Dist: pypy-only; implementation_name == \"pypy\"", "Requires-Dist: tests; extra == 'test'",
                          "Requires-Dist: new-python; python_full_version >= '3.12'"])
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("demo-1.0.dist-info/METADATA", metadata)
    assert gpu_bundle.requirements(wheel) == {"plain-name", "linux-only", "new-python"}


def test_bitsandbytes_keeps_its_cuda_13_and_cpu_libraries_only():
    keep = [n for n in ("bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so",
                        "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda128.so",
                        "bitsandbytes/libbitsandbytes_rocm72.so") if gpu_bundle.BNB_KEEP.search(n)]
    assert keep == ["bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so",
                    "bitsandbytes/libbitsandbytes_cpu.so"]
