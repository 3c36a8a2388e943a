"""The machine (probunlearn.hardware): the CPU's default dtype, its one-off bfloat16 measurement, and oneDNN's
packed float32 products."""

import pytest
import torch

from probunlearn import hardware


def test_cpu_dtype_is_bfloat16_only_where_it_is_native_and_faster(monkeypatch):
    monkeypatch.delenv("PROBUNLEARN_DTYPE", raising=False)
    choices = {}
    for kind, speedup in (("none", 9.0), ("amx", 0.1), ("native", 1.8), ("native", 0.55)):
        monkeypatch.setattr(hardware, "_cpu_bf16_kind", lambda kind=kind: kind)
        monkeypatch.setattr(hardware, "bf16_speedup", lambda speedup=speedup: speedup)
        choices[kind, speedup] = hardware.default_dtype("cpu")
    assert choices == {("none", 9.0): torch.float32, ("amx", 0.1): torch.bfloat16,
                       ("native", 1.8): torch.bfloat16, ("native", 0.55): torch.float32}
    monkeypatch.setenv("PROBUNLEARN_DTYPE", "float32")  # the override wins
    assert hardware.default_dtype("cpu") == torch.float32


def test_bf16_speedup_is_measured_once_per_cpu_and_kept(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("PROBUNLEARN_CACHE", str(tmp_path))
    hardware.bf16_speedup.cache_clear()
    try:
        measured = hardware.bf16_speedup()
        table = json.loads((tmp_path / "cpu_bf16.json").read_text())
        assert list(table) == [hardware._cpu_key()] and table[hardware._cpu_key()] == pytest.approx(measured, abs=1e-3)
        assert measured > 0
        table[hardware._cpu_key()] = 7.5  # a later process reads the kept number instead of measuring again
        (tmp_path / "cpu_bf16.json").write_text(json.dumps(table))
        hardware.bf16_speedup.cache_clear()
        assert hardware.bf16_speedup() == 7.5
    finally:
        hardware.bf16_speedup.cache_clear()


def test_onednn_linear_computes_the_float32_product_forward_and_backward():
    """`hardware.OneDNNLinear`: the same numbers as nn.Linear (to rounding), the input's gradient through a
    frozen weight, the default path for a trained weight, a fresh pack after the weight changes."""
    import copy

    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80)
    fast = copy.deepcopy(plain)
    fast.__class__ = hardware.OneDNNLinear
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    for module in (plain, fast):
        module.weight.requires_grad_(False)
        module.bias.requires_grad_(False)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    for module, inp in zip((plain, fast), inputs):
        (module(inp) ** 2).sum().backward()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, rtol=1e-4, atol=1e-4)
    fast.weight.requires_grad_(True)  # a weight being trained: nn.Linear's own forward, with its gradient
    fast(x).sum().backward()
    assert fast.weight.grad is not None
    with torch.no_grad():
        fast.weight.mul_(2.0)  # e.g. an adapter merged into it: the packed copy is rebuilt
        torch.testing.assert_close(fast(x), torch.nn.functional.linear(x, fast.weight, fast.bias), rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy(fast)
    assert type(clone) is hardware.OneDNNLinear and not hasattr(clone, "_onednn_packed")
    with torch.no_grad():
        torch.testing.assert_close(clone(x), fast(x))


def test_freed_memory_is_reused_on_glibc_unless_told_otherwise(monkeypatch):
    import ctypes
    import platform

    hardware.reuse_freed_memory.cache_clear()
    monkeypatch.setenv("PROBUNLEARN_MALLOC", "system")
    assert hardware.reuse_freed_memory() is False
    hardware.reuse_freed_memory.cache_clear()
    monkeypatch.delenv("PROBUNLEARN_MALLOC")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert hardware.reuse_freed_memory() is glibc
    if glibc:  # mallopt takes the settings (1 = accepted); setting them again changes nothing
        assert ctypes.CDLL("libc.so.6").mallopt(-3, hardware.HEAP_THRESHOLD) == 1
