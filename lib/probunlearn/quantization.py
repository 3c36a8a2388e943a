"""Quantised models: the bitsandbytes settings of 4-bit NF4 (QLoRA) and 8-bit LLM.int8, the plain
4-bit storage layout that QLoRA training needs on a CPU, and quantised copies of a released model for
the quantisation attack of notebook 06 (Zhang et al. 2024, arXiv 2410.16454).

bitsandbytes and transformers' loaders are imported inside the functions that use them: bitsandbytes
is optional on some machines, and both take seconds to import. The exception: while the Hugging Face
hub is offline, importing this module (every module that uses peft imports it through `models`)
imports bitsandbytes at once, without its kernel-hub lookup (`import_bitsandbytes_offline`).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from probunlearn.hardware import model_device
from probunlearn.utils import quiet_bitsandbytes

QUANTIZATIONS = ("4bit", "8bit")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE), as huggingface_hub reads it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def import_bitsandbytes_offline() -> bool:
    """Import bitsandbytes without its kernel-hub lookup, if the hub is offline and bitsandbytes is
    installed but not imported yet; returns whether it imported it here.

    Why: on a CPU with AVX512-BF16, importing bitsandbytes (peft does) runs its CPU backend, which
    asks the Hugging Face kernel hub for a fused 4-bit product: `kernels.get_kernel(
    "kernels-community/quantization-bitsandbytes")`. Offline that cannot succeed. kernels >= 0.19
    warns first that it skips the publisher's trust check, then finds no download, and bitsandbytes
    falls back to its own kernels. Here `kernels` cannot be imported while bitsandbytes is imported,
    so it falls back at once, without asking. Afterwards `kernels` is importable again (transformers
    uses it). Online, nothing changes: the hub may serve the kernel."""
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None or not hub_offline():
        return False
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError
    try:
        import bitsandbytes  # noqa: F401
    finally:
        if kernels is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
    return True


import_bitsandbytes_offline()  # before peft or transformers import bitsandbytes (they do through `models`)


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

    quiet_bitsandbytes()  # already done at `import probunlearn`; again in case the filters were reset
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_use_double_quant=True)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")


def quantized_copies(model, quantizations: Sequence[str], *, dtype: torch.dtype | None = None) -> dict:
    """bitsandbytes-quantised copies of a plain (merged) model, {quantization: model}, as a user
    would quantise a released unlearned model (the quantisation attack of Zhang et al. 2024, arXiv
    2410.16454): its weights are written once to a temporary folder and reloaded with
    `bnb_config(q)` for each q, so every linear layer of the blocks is quantised, the unlearning
    update included. Runs on a CPU (slowly) and on a GPU, on the model's device. The original model
    is not changed. `dtype`: of the temporary weights and of the 4-bit layers' products (default: the
    model's own; a float32 copy of phi-1.5 is 5.6 GB on disk, and float32 is bitsandbytes' slow path
    on a GPU)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if hasattr(model, "peft_config"):
        raise ValueError("quantized_copy takes a plain model: merge the adapter first "
                         "(load_model(adapter_dir, merge=True), or models.merge_adapter(model))")
    dtype = dtype or next(model.parameters()).dtype
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


def quantized_copy(model, quantization: str, *, dtype: torch.dtype | None = None):
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
