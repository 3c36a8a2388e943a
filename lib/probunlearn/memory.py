"""Memory plans for one GPU: the peak memory of sampling, of an unlearning step (QLoRA with its
reference model, or [P1]'s full fine-tuning) and of relearning, from a model's config alone (the
model is built on the meta device: no weights, no GPU), so that the sampler sizes its batch before it
allocates anything, and a test on a CPU can say what fits a 24 GB consumer GPU and a T4's 15 GB.

A plan is a sum of named parts in bytes (`Plan`): weights, trained weights with their gradients and
AdamW state, saved activations, logits, the key/value cache, a workspace for drawing tokens, and
`OVERHEAD` for the CUDA context and the allocator's slack. The parts are counted from the shapes the
code runs (our sampler's cache holds a row per distinct prefix and per answer, `kv_cache`; the loss
reads the output head on answer positions, `answers.answer_loss`), rounded up where the exact figure
depends on the kernels (saved activations per block, `ACTIVATION_VALUES`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from probunlearn.utils import load_profile

GB = 10**9  # GPUs are sold in GB: "24 GB" is 24e9 bytes (22.4 GiB)
OVERHEAD = int(1.0 * GB)  # CUDA context, cuBLAS workspace, the caching allocator's fragmentation
NF4_BYTES = 4.127 / 8  # bitsandbytes NF4 with double quantisation: 4 bits + 0.127 bits of block constants
# Values a transformer block keeps per token for its backward pass, in units of (hidden size) and
# (MLP width): the inputs of its 4 attention and 2-3 MLP products, norms, residuals, q/k/v and the
# MLP's gate, up and activation outputs (Korthikanti et al. 2022 count ~34 h bytes in half precision
# for a GPT block, 17 values; ours are gated MLPs and grouped keys, so counted as 8 h + 4 m, rounded up).
ACTIVATION_VALUES = (8, 4)


def nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Shape:
    """What a plan needs of a causal LM: its sizes and parameter counts (built on the meta device)."""

    name: str
    layers: int
    hidden: int
    mlp: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # every parameter
    linear_params: int  # in the blocks' linear layers (what NF4 quantises and LoRA adapts)
    lora_params_per_rank: int  # LoRA parameters per unit of rank on every linear layer of the blocks
    tied: bool

    @classmethod
    def of(cls, config, name: str | None = None) -> "Shape":
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        head = model.get_output_embeddings()
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(name=name or config.model_type, layers=config.num_hidden_layers, hidden=config.hidden_size,
                   mlp=config.intermediate_size, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, vocab=config.vocab_size,
                   params=sum(p.numel() for p in model.parameters()),
                   linear_params=sum(m.weight.numel() for m in linears),
                   lora_params_per_rank=sum(m.in_features + m.out_features for m in linears),
                   tied=bool(getattr(config, "tie_word_embeddings", False)))

    def kv_bytes_per_position(self, dtype: torch.dtype) -> int:
        """Keys and values of one position of one row, every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * nbytes(dtype)

    def weight_bytes(self, dtype: torch.dtype, quantization: str | None = None, *,
                     kbit_training: bool = False) -> int:
        """The weights: all in `dtype`, or with `quantization="4bit"` the blocks' linear layers in NF4
        and the rest (embeddings, head, norms) in `dtype`, or in float32 after peft's
        `prepare_model_for_kbit_training` (`kbit_training`)."""
        if quantization is None:
            return self.params * nbytes(dtype)
        if quantization != "4bit":
            raise ValueError(f"quantization must be None or '4bit', got {quantization!r}")
        rest = self.params - self.linear_params
        return int(self.linear_params * NF4_BYTES) + rest * (4 if kbit_training else nbytes(dtype))


_SHAPES: dict[str, Shape] = {}


def shape_of(model) -> Shape:
    """`Shape.of(model.config)`, built once per config."""
    key = model.config.to_json_string()
    if key not in _SHAPES:
        _SHAPES[key] = Shape.of(model.config)
    return _SHAPES[key]


@dataclass
class Plan:
    """Peak memory as named parts (bytes); `total` includes `OVERHEAD`."""

    what: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values()) + OVERHEAD

    def fits(self, budget_gb: float) -> bool:
        return self.total <= budget_gb * GB

    def row(self) -> dict:
        return {"plan": self.what, **{k: round(v / GB, 2) for k, v in self.parts.items()},
                "overhead": OVERHEAD / GB, "total GB": round(self.total / GB, 2)}


# ----------------------------------------------------------------------------- sampling
DRAW_VALUES = 4  # float32 values per (row, vocabulary entry) at a step: logits, probabilities, race keys, a copy


def sampling_plan(shape: Shape, *, rows: int, positions: int, rows_per_prompt: float = 1.0,
                  dtype: torch.dtype = torch.bfloat16, quantization: str | None = None) -> Plan:
    """Our sampler decoding `rows` answers of at most `positions` tokens (prompt + answer) at once:
    weights, the key/value cache allocated up front (a row per answer and per distinct prompt,
    `rows_per_prompt` answers sharing a prompt), the draw's float32 workspace over the vocabulary,
    and the prompt pass's MLP activations."""
    cache_rows = rows + math.ceil(rows / max(rows_per_prompt, 1.0))
    prompts = math.ceil(rows / max(rows_per_prompt, 1.0))
    return Plan(f"sampling {rows} rows x {positions} positions", {
        "weights": shape.weight_bytes(dtype, quantization),
        "kv cache": cache_rows * positions * shape.kv_bytes_per_position(dtype),
        "draw": rows * shape.vocab * 4 * DRAW_VALUES,
        "activations": prompts * positions * (shape.hidden * 4 + shape.mlp * 3) * nbytes(dtype),
    })


MAX_ROWS = 2048  # the most rows a GPU batch holds (more gives no speed once the products are large)


def sampling_rows(shape: Shape, *, positions: int, budget: int, rows_per_prompt: float = 1.0,
                  dtype: torch.dtype = torch.bfloat16, quantization: str | None = None, most: int = MAX_ROWS) -> int:
    """The largest batch (rows decoded together, up to `most`) whose `sampling_plan` fits `budget`
    bytes. Raises MemoryError when not even one row fits."""
    plan = lambda rows: sampling_plan(shape, rows=rows, positions=positions, rows_per_prompt=rows_per_prompt,
                                      dtype=dtype, quantization=quantization).total
    if plan(1) > budget:
        raise MemoryError(f"{shape.name}: one row of {positions} positions needs {plan(1) / GB:.1f} GB, "
                          f"more than the budget of {budget / GB:.1f} GB")
    low, high = 1, most
    while low < high:  # the plan grows with rows: bisect
        middle = (low + high + 1) // 2
        low, high = (middle, high) if plan(middle) <= budget else (low, middle - 1)
    return low


def gpu_budget(device=None, *, loaded: int = 0) -> int:
    """Bytes a plan may count on the GPU: `PROBUNLEARN_GPU_MEMORY_GB` where set (the card's size, e.g.
    15 to plan a T4 on a larger card), else 90 % of what the device has free now plus what the plan
    counts that is already there: `loaded` bytes of weights and the CUDA context (`OVERHEAD`)."""
    setting = os.environ.get("PROBUNLEARN_GPU_MEMORY_GB")
    if setting:
        return int(float(setting) * GB)
    free, _ = torch.cuda.mem_get_info(device)
    return int(0.9 * free) + loaded + OVERHEAD


# ----------------------------------------------------------------------------- training steps
def training_plan(shape: Shape, *, tokens: int, answer_tokens: int, method: str = "ga", lora_r: int | None = 32,
                  dtype: torch.dtype = torch.bfloat16, quantization: str | None = "4bit",
                  gradient_checkpointing: bool = False, reference_tokens: int = 0,
                  what: str | None = None) -> Plan:
    """One optimiser step: `tokens` positions through the model (every batch of the step: forget,
    retain, mismatch), `answer_tokens` of them through the output head (the loss reads answers only),
    `reference_tokens` through the frozen reference too (npo, ga_kl: the adapter disabled, no graph).
    `lora_r`: a LoRA adapter of that rank on every linear layer of the blocks (QLoRA with
    `quantization="4bit"`: the rest of the weights in `dtype`, as `models.add_lora` leaves them);
    None: full fine-tuning ([P1]), float32 weights under autocast. The trained weights
    carry float32 values, gradients and two AdamW moments (16 bytes each). Saved activations:
    `ACTIVATION_VALUES` per token and block, or with gradient checkpointing the blocks' inputs and
    one block recomputed."""
    half = nbytes(dtype)
    if lora_r is None:
        weights, trained = shape.params * 4, shape.params * 16
        weights_part = {"weights (float32)": weights, "gradients + AdamW": trained - weights}
    else:
        weights = shape.weight_bytes(dtype, quantization)  # models._freeze_4bit keeps the rest in `dtype`
        trained = shape.lora_params_per_rank * lora_r * 16
        weights_part = {"weights": weights, "adapter + gradients + AdamW": trained}
    per_block = (ACTIVATION_VALUES[0] * shape.hidden + ACTIVATION_VALUES[1] * shape.mlp) * half
    if gradient_checkpointing:
        activations = tokens * (shape.layers * shape.hidden * half + per_block)
    else:
        activations = tokens * shape.layers * per_block
    # the head on answer positions: logits in the model's dtype, a float32 copy and its gradient
    logits = answer_tokens * shape.vocab * (half + 8) + reference_tokens * shape.vocab * 4
    return Plan(what or f"{method} step, {'full fine-tuning' if lora_r is None else f'LoRA r={lora_r}'}"
                        f"{' 4-bit' if quantization and lora_r is not None else ''}, {tokens} tokens"
                        f"{', checkpointed' if gradient_checkpointing else ''}",
                {**weights_part, "activations": activations, "logits": logits})


# ----------------------------------------------------------------------------- the paper's models, from their configs
def paper_configs() -> dict:
    """The configs of the paper profile's models, written here (no download): microsoft/phi-1_5 and
    meta-llama/Llama-3.2-1B-Instruct (their config.json, the sizes that matter for memory)."""
    from transformers import LlamaConfig, PhiConfig

    return {
        "phi-1.5": PhiConfig(vocab_size=51200, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                             num_attention_heads=32, num_key_value_heads=32, partial_rotary_factor=0.5,
                             max_position_embeddings=2048, tie_word_embeddings=False),
        "Llama-3.2-1B": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                    num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                    max_position_embeddings=131072, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192}),
    }


# ----------------------------------------------------------------------------- a profile's steps
BATCHES = {"ga": ("forget",), "ga_temp": ("forget",), "gd": ("forget", "retain"), "ga_kl": ("forget", "retain"),
           "npo": ("forget", "retain"), "ga_mismatch": ("forget", "retain", "mismatch")}
REFERENCE = {"npo": "forget", "ga_kl": "retain"}  # the batch the frozen reference reads


def profile_plans(settings: dict, shape: Shape, *, sequence: int = 256, prompt: int = 64,
                  dtype: torch.dtype = torch.bfloat16, budget_gb: float = 24.0,
                  gradient_checkpointing: bool = False, relearn_rows: int = 8) -> list[Plan]:
    """The peak memory of each kind of step a profile (`utils.load_profile`) runs on `shape`, with
    rows padded to `sequence` tokens of which up to the profile's longest answer are answer tokens:
    notebook 03's unlearning step (the method of `UNLEARN_METHODS` that needs the most), notebook
    04's step (full fine-tuning, or LoRA where `DYNAMICS_TUNING` says so), both in parts of
    `UNLEARN_MICRO_BATCH` forget rows where the profile sets it (`unlearning.unlearn`'s
    micro_batch_size: one part's activations and logits), notebook 05's sampling (the batch
    `sampling_rows` plans for `budget_gb`) and notebook 06's relearning step (a LoRA on the float32
    merge, in parts of `relearn_rows` rows: `attacks.RELEARN_MICRO_BATCH` on a GPU)."""
    quantization = settings.get("QUANTIZATION")
    whole, answer = settings["UNLEARN_BATCH_SIZE"], min(settings["UNLEARN_MAX_NEW_TOKENS"], sequence)
    batch = min(whole, settings.get("UNLEARN_MICRO_BATCH") or whole)  # forget rows in memory at once
    in_parts = f"batch {whole}" + (f" in parts of {batch}" if batch < whole else "")
    plans = []
    for method in settings["UNLEARN_METHODS"]:
        rows = {"forget": batch, "retain": batch, "mismatch": batch * settings.get("MISMATCH_PER_PROMPT", 1)}
        used = [rows[b] for b in BATCHES[method]]
        plans.append(training_plan(shape, tokens=sum(used) * sequence, answer_tokens=sum(used) * answer, method=method,
                                   lora_r=settings["UNLEARN_LORA_R"], dtype=dtype, quantization=quantization,
                                   gradient_checkpointing=gradient_checkpointing,
                                   reference_tokens=rows[REFERENCE[method]] * answer if method in REFERENCE else 0,
                                   what=f"03 unlearning step ({method}, {in_parts}"
                                        f"{', checkpointed' if gradient_checkpointing else ''})"))
    worst = max(plans, key=lambda p: p.total)
    pad = settings.get("ENTROPY_PAD_TO") or sequence  # the entropy term reads every position: logits of all
    lora = settings.get("DYNAMICS_TUNING", "full") == "lora"  # notebook 03's adapter instead of every weight
    entropy = [training_plan(shape, tokens=2 * batch * pad, answer_tokens=2 * batch * pad,
                             lora_r=settings["UNLEARN_LORA_R"] if lora else None,
                             quantization=quantization if lora else None, dtype=dtype,
                             gradient_checkpointing=gradient_checkpointing,
                             what=f"04 {'LoRA' if lora else 'full fine-tuning'} step ({in_parts}, forget + retain"
                                  f"{', checkpointed' if gradient_checkpointing else ''})")]
    positions = prompt + settings["SAMPLE_MAX_NEW_TOKENS"]
    samples = settings["NUM_SAMPLES"] + 1
    rows = sampling_rows(shape, positions=positions, budget=int(budget_gb * GB), rows_per_prompt=samples,
                         dtype=dtype, quantization=quantization)
    sampling = sampling_plan(shape, rows=rows, positions=positions, rows_per_prompt=samples, dtype=dtype,
                             quantization=quantization)
    sampling.what = f"05 sampling ({rows} rows planned for {budget_gb:g} GB)"
    relearn = training_plan(shape, tokens=relearn_rows * sequence, answer_tokens=relearn_rows * answer,
                            lora_r=settings["RELEARN_LORA_R"], quantization=None, dtype=torch.float32,
                            gradient_checkpointing=gradient_checkpointing,
                            what=f"06 relearning step (parts of {relearn_rows} rows, float32 merge"
                                 f"{', checkpointed' if gradient_checkpointing else ''})")
    return [worst, *entropy, sampling, relearn]


def main() -> None:
    """`python -m probunlearn.memory`: the paper profile's plans for phi-1.5 and Llama-3.2-1B."""
    import pandas as pd

    settings = load_profile("paper")
    rows = []
    for name, config in paper_configs().items():
        shape = Shape.of(config, name)
        plans = {checkpointed: profile_plans(settings, shape, gradient_checkpointing=checkpointed)
                 for checkpointed in (False, True)}
        t4 = profile_plans(settings, shape, budget_gb=15.0, dtype=torch.float16, gradient_checkpointing=True)
        for plain, checkpointed, small in zip(plans[False], plans[True], t4):
            step = plain.what
            if step.startswith("05"):
                step = f"{step[:-1]}, {small.what.split('(')[1].split(' rows')[0]} for a T4's 15 GB)"
            rows.append({"model": name, "step": step,
                         "GB, every activation kept": round(plain.total / GB, 1),
                         "GB, checkpointed": round(checkpointed.total / GB, 1),
                         "fits 24 GB": checkpointed.fits(24), "fits a T4 (15 GB)": small.fits(15)})
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
