"""The machine a run is on: its device and default dtype, what its CPU multiplies fast, float32 products
through oneDNN, and the one-line description that every reported time carries.

Default dtype (when `dtype=None`): bfloat16 on a CUDA GPU that computes it natively (compute
capability >= 8.0: Ampere and later), float16 below that (a T4, Colab's free GPU: 7.5), bfloat16
on a CPU with AMX matrix units (about 4x faster than fp32 there) or with AVX512-BF16 where a
one-off measurement finds its products >= 1.25x faster than float32 (`cpu_has_bf16`: so on an AMD
EPYC Zen 5, not on a Xeon VM without AMX, where they are ~1.8x slower), else float32 (on an
AVX2-only CPU bfloat16 is emulated, ~50x slower).
`PROBUNLEARN_DTYPE` overrides the choice. `precision(device)` gives the whole plan a run follows
from it: the frozen weights' dtype, the trained weights' and the optimiser's (always float32: peft
upcasts LoRA adapters, full fine-tuning keeps float32 weights), the products of a training step, the
loss scaling float16 needs, and the dtype vLLM is given.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from probunlearn.utils import cache_dir

# The settings that cap the instruction set torch's kernels use (`make ... CPU_AS=avx2` sets all three):
# on an AVX-512 machine they give the timings of an AVX2-only one.
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16() -> bool:
    """True when bfloat16 matrix products are clearly faster than float32 on this CPU.

    With AMX tiles they are (~4x). With AVX512-BF16 but no AMX it depends on the chip, so it is
    measured once (`bf16_speedup`) and cached: on a 2-core Xeon VM float32 was ~1.8x faster (oneDNN,
    packed weights, 2026-12-02), on a 2-core AMD EPYC (Zen 5) bfloat16 was ~1.8x faster. Without
    native bfloat16 (AVX2 class, or kernels capped at AVX2) it is emulated and never chosen."""
    kind = _cpu_bf16_kind()
    return kind == "amx" or (kind == "native" and bf16_speedup() >= BF16_MIN_SPEEDUP)


def cpu_bf16_measurement() -> float | None:
    """`bf16_speedup()` where it decides the CPU dtype (native bfloat16 without AMX), else None."""
    return bf16_speedup() if _cpu_bf16_kind() == "native" else None


def _cpu_bf16_kind() -> str:
    """"amx", "native" (AVX512-BF16 without AMX) or "none" (emulated: AVX2 class, or capped below AVX-512)."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "none"
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        return "amx" if amx and amx() else "native"
    except (AttributeError, RuntimeError):
        return "none"


BF16_MIN_SPEEDUP = 1.25  # bfloat16 is the CPU default only when its products are at least this much faster


def _cpu_key() -> str:
    """This CPU and the settings that change its matrix-product rates (torch, threads, ISA caps)."""
    name = platform.processor()
    with contextlib.suppress(OSError):  # a VM may name every EPYC "AMD EPYC": family and model tell them apart
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        name = f"{fields.get('model name', name)} (family {fields.get('cpu family')}, model {fields.get('model')})"
    caps = ",".join(f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k))
    return f"{name}|torch {torch.__version__}|{torch.get_num_threads()} threads|{caps}"


def _best_seconds(product: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed calls of `product`, after 3 warm-up calls."""
    for _ in range(3):
        product()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def bf16_speedup() -> float:
    """float32 time / bfloat16 time of the model's matrix products on this CPU (> 1: bfloat16 is
    faster), measured once per CPU, torch version, thread count and ISA cap (~0.5 s) and kept in
    `cache_dir()/cpu_bf16.json`, so every process of a run makes the same choice."""
    path, key = cache_dir() / "cpu_bf16.json", _cpu_key()
    table = {}
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(path.read_text())
    if key in table:
        return float(table[key])

    total = {torch.float32: 0.0, torch.bfloat16: 0.0}
    with torch.no_grad():
        for rows, inner, outer in ((256, 576, 1536), (256, 1536, 576)):  # a decoding step's MLP
            x, w = torch.randn(rows, inner), torch.randn(outer, inner)
            fp32 = (OneDNNLinear if _onednn_available() else torch.nn.Linear)(inner, outer, bias=False)
            fp32.weight.copy_(w)
            fp32.requires_grad_(False)
            total[torch.float32] += _best_seconds(lambda: fp32(x), 10)
            xb, wb = x.bfloat16(), w.bfloat16()
            total[torch.bfloat16] += _best_seconds(lambda: torch.nn.functional.linear(xb, wb), 10)
    speedup = total[torch.float32] / total[torch.bfloat16]
    table[key] = round(speedup, 3)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1))
        tmp.replace(path)
    return speedup


def default_dtype(device: str) -> torch.dtype:
    """bfloat16 where the hardware multiplies it natively, else float32 (CPU) or float16 (GPU).
    `PROBUNLEARN_DTYPE=float32` (or any torch dtype name) overrides it, e.g. to time an AMX machine
    the way an AVX2-only one runs."""
    forced = os.environ.get("PROBUNLEARN_DTYPE")
    if forced:
        dtype = getattr(torch, forced, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"PROBUNLEARN_DTYPE={forced!r} is not a torch dtype; use e.g. float32 or bfloat16")
        return dtype
    if str(device).startswith("cuda"):
        return torch.bfloat16 if gpu_has_bf16(device) else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


BF16_MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs whose tensor cores multiply bfloat16


def gpu_has_bf16(device: str = "cuda") -> bool:
    """True on a GPU of compute capability >= 8.0. `torch.cuda.is_bf16_supported()` is not the test:
    it also answers True where bfloat16 is emulated (a T4, 7.5), which is slow there and which
    PyTorch's fast attention kernels do not take."""
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_MIN_CAPABILITY


@dataclass(frozen=True)
class Precision:
    """The dtypes of a run on one device (`precision`).

    weights: the frozen weights of every model we load (`models.load_model`'s default).
    trained: the weights a step updates (LoRA adapters: peft upcasts them; full fine-tuning:
        `unlearning.start_full_unlearning` loads float32) and so the optimiser's state: float32
        everywhere, because an AdamW update of lr 1e-5 is below half a unit in the last place of a
        bfloat16 weight and rounds away.
    autocast: the dtype of a training step's products when the trained weights are float32 and
        the device has a faster one (full fine-tuning, `unlearning.full_tuning_dtype`), else None.
    loss_scaling: float16 products: gradients below 6e-8 flush to zero (2^-24), so a training step
        scales the loss up and unscales the gradients (`torch.amp.GradScaler`, `loss_scaler`);
        bfloat16 has float32's range and needs none.
    vllm: the `dtype` vLLM is started with: the weights' (vLLM refuses bfloat16 below compute
        capability 8.0, so a T4 gets "float16").
    """

    weights: torch.dtype
    trained: torch.dtype
    autocast: torch.dtype | None
    loss_scaling: bool
    vllm: str


def precision(device: str) -> Precision:
    """The dtypes a run on `device` uses (see `Precision`): bfloat16 weights where the hardware
    multiplies bfloat16 natively (a GPU of compute capability >= 8.0; a CPU with AMX, or with
    AVX512-BF16 measured faster); on an older GPU (a T4) float16 weights with float32 adapters and
    loss scaling, rather than float32 weights (twice the memory, and no tensor cores) or emulated
    bfloat16 (slow, and outside PyTorch's fast attention kernels); else float32. Follows
    `PROBUNLEARN_DTYPE` where it is set."""
    weights = default_dtype(device)
    low = weights in (torch.bfloat16, torch.float16)
    return Precision(weights=weights, trained=torch.float32, autocast=weights if low else None,
                     loss_scaling=weights == torch.float16, vllm=str(weights).removeprefix("torch."))


def loss_scaler(model, compute_dtype: torch.dtype | None = None) -> "torch.amp.GradScaler":
    """A `torch.amp.GradScaler` for a training loop on `model`: enabled where a step computes in
    float16 (float16 weights, or `compute_dtype` float16), otherwise a pass-through (its `scale`,
    `step` and `update` then do what plain `backward` and `optimizer.step` would). With it, a step
    whose scaled gradients overflowed is skipped and the scale halved; the first steps of a run
    may be skipped while the scale settles (it starts at 2^16)."""
    device = model_device(model)
    float16 = compute_dtype == torch.float16 or any(p.dtype == torch.float16 for p in model.parameters())
    return torch.amp.GradScaler(device.type, enabled=float16)


# ----------------------------------------------------------------------------- faster float32 products on a CPU
def _onednn_available() -> bool:
    return (os.environ.get("PROBUNLEARN_ONEDNN", "1") != "0" and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and torch.backends.mkldnn.is_available())


def _onednn_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _PackedProduct(torch.autograd.Function):
    """x @ W^T with W frozen, forward and backward through oneDNN's packed weights (no gradient for W)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return _onednn_product(x, module._packed(), module.bias)

    @staticmethod
    def backward(ctx, grad):
        return _onednn_product(grad.contiguous(), ctx.module._packed(transposed=True), None), None


class OneDNNLinear(torch.nn.Linear):
    """An `nn.Linear` whose float32 product on a CPU runs through oneDNN with the weight packed once
    (`torch.ops.mkldnn`), also under autograd when the weight is frozen (the input's gradient goes
    through a packed transpose). Measured on a 2-core AVX2 machine: 1.3-2.2x the GEMM rate of the
    default path for the model's shapes (`benchmarks/README.md`). The weights and every number are
    those of float32 products (the results differ from the default kernel by rounding only); any
    other case (GPU, another dtype, a trained weight) runs `nn.Linear`'s own forward. The packed
    copies are rebuilt when the weight is replaced or changed in place through the parameter; a
    change through `weight.data` (peft's merge) is invisible to it: merge with `merge_adapter`."""

    def _packed(self, transposed: bool = False) -> torch.Tensor:
        """The weight packed for the forward product, or (`transposed`) its transpose for the input's
        gradient, packed on first use: decoding and evaluation never pack the latter."""
        key = (self.weight.data_ptr(), self.weight._version)
        cached = getattr(self, "_onednn_packed", None)
        if cached is None or cached[0] != key:
            cached = (key, {})
            object.__setattr__(self, "_onednn_packed", cached)  # not a parameter, buffer or submodule
        if transposed not in cached[1]:
            with torch.inference_mode(False), torch.no_grad():
                weight = self.weight.detach()
                cached[1][transposed] = torch.ops.mkldnn._reorder_linear_weight(
                    weight.t().contiguous() if transposed else weight, 256)
        return cached[1][transposed]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled()
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or (training and (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)))):
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        if training and x.requires_grad:
            out = _PackedProduct.apply(flat, self)
        else:
            out = _onednn_product(flat, self._packed(), self.bias)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def __deepcopy__(self, memo):
        copy_ = torch.nn.Linear.__new__(OneDNNLinear)
        memo[id(self)] = copy_
        for name, value in self.__dict__.items():
            if name != "_onednn_packed":
                object.__setattr__(copy_, name, copy.deepcopy(value, memo))
        return copy_


def matrix_gflops(dtype: torch.dtype | None = None, shape: tuple[int, int, int] = (512, 576, 1536),
                  repeats: int = 20) -> float:
    """This CPU's matrix-product rate in GFLOP/s for one (m x k) @ (k x n) product in `dtype` (default:
    what `default_dtype` picks for the CPU), best of `repeats`: the faster of the plain product and,
    in float32, oneDNN's product with a packed weight (what our float32 models run). The default
    shape is SmolLM2's MLP product for 512 rows. `benchmarks/sampling.py` reports it, and
    `reproduce` picks a profile's slow-CPU sizes from it (`SLOW_CPU_GFLOPS`)."""
    dtype = dtype or default_dtype("cpu")
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator).to(dtype), torch.randn(k, n, generator=generator).to(dtype)
    products = [lambda: a @ b]
    if dtype == torch.float32 and _onednn_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), 256)
        products.append(lambda: _onednn_product(a, packed, None))
    return 2 * m * k * n / min(_best_seconds(product, repeats) for product in products) / 1e9


def use_onednn(model):
    """Turn every plain `nn.Linear` of a float32 CPU model into a `OneDNNLinear` (in place; a no-op
    when oneDNN's packed products are unavailable or `PROBUNLEARN_ONEDNN=0`). `load_model` calls it
    for CPU float32 models. Returns the model."""
    if not _onednn_available():
        return model
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = OneDNNLinear
    return model


# glibc's malloc maps every block above its threshold (at most 32 MiB) afresh and unmaps it on free, so
# each such tensor pays a page fault per 4 KiB on first touch: a decoding step's logits and
# probabilities (256 rows x 49k vocabulary in float32 is 50 MB) cost 3-4x their arithmetic that way.
HEAP_THRESHOLD = 256 * 2**20  # blocks up to this size come from the heap and are reused
HEAP_KEEP = 1024 * 2**20  # freed heap memory kept for reuse before any is returned to the system


@functools.cache
def reuse_freed_memory() -> bool:
    """Let glibc serve tensors up to `HEAP_THRESHOLD` from its heap and keep up to `HEAP_KEEP` of freed
    memory, instead of mapping and unmapping each large block (`mallopt`; once per process). The
    process then keeps up to `HEAP_KEEP` more resident after its peak. The sampler calls it; a
    draw over 256 rows x 49k tokens took 18 ms with it, 42 ms without (2-core AMD EPYC Zen 4,
    `benchmarks/README.md`). False where the C library is not glibc, or `PROBUNLEARN_MALLOC=system`."""
    if platform.system() != "Linux" or os.environ.get("PROBUNLEARN_MALLOC") == "system":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, HEAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, HEAP_KEEP))


def model_device(model) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- the machine, in one line
def machine() -> dict[str, Any]:
    """What this machine is, for every reported time: CPU model, its vector extensions that matter
    for matrix work (AVX2, AVX-512, AVX512-BF16, AMX), whether bfloat16 is the faster dtype (AMX, or
    AVX512-BF16 measured faster, `bf16_speedup`; else the default dtype is float32), threads,
    and the torch version."""
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
