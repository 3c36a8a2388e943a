"""Which engine samples a model: our exact sampler (`sampling`) or vLLM (`vllm_backend`), by the
profile's `SAMPLER`. Either goes to the sampling functions, which give the same tables.
"""

from __future__ import annotations

import torch

from probunlearn import vllm_backend
from probunlearn.hardware import default_device, precision
from probunlearn.models import load_model, load_tokenizer

SAMPLERS = ("ours", "vllm")


def load_sampler(path, *, sampler: str = "ours", quantization: str | None = None, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, lora: bool | None = None, dtype: torch.dtype | None = None):
    """What to sample a model from (anything `models.load_model` takes): `(model, tokenizer)` for our
    sampler, or `(engine, tokenizer)` for `sampler="vllm"`, an engine of `vllm_backend.shared_sampler`
    in the dtype our sampler would use (`dtype`: another one, for both samplers). On a GPU (`lora=None`
    or True) it starts once per base model and saved adapters become LoRA requests on it; on a CPU, where vLLM's LoRA is slow, each adapter
    is merged and gets an engine of its own. `tensor_parallel_size` and `data_parallel_size` go to
    vLLM. Either goes to `sample_answers`, `greedy_answers`, `greedy_and_sampled_answers` and
    `probabilistic.evaluate_model`, which give the same tables. `close_samplers()` shuts a vLLM
    engine down."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "ours":
        return load_model(path, quantization=quantization, dtype=dtype)
    tokenizer = load_tokenizer(path)
    # the weights ours would use (float16 on a GPU below compute capability 8.0, where vLLM refuses bfloat16)
    name = str(dtype).removeprefix("torch.") if dtype is not None else precision(default_device()).vllm
    engine = vllm_backend.shared_sampler(path, tokenizer, quantization=quantization,
                                         tensor_parallel_size=tensor_parallel_size,
                                         data_parallel_size=data_parallel_size, lora=lora, dtype=name)
    return engine, tokenizer


def close_samplers() -> None:
    """Shut down the vLLM engine `load_sampler` started, if any (our sampler holds nothing)."""
    vllm_backend.close_shared_sampler()
