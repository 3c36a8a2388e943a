"""Attention for decoding on a CPU: one query token per row against the key/value cache, as plain
matrix products with the grouped query heads packed together (SPEC §5, `sampling`).

PyTorch's fused CPU kernel (sdpa) runs one small task per (row, key/value head) and spends most of
its time outside the arithmetic when the query is a single token: at 256 rows and ~90 cached
positions it took ~5 ms per layer where the same arithmetic as matrix products takes ~2 ms
(`benchmarks/README.md`). `decode_attention` computes exactly what transformers' eager attention
computes (scores in the model's dtype, scaled, masked, softmax in float32 cast back, times the
values), without copying each key/value head for its query heads: the query heads that share a
key/value head become the rows of one product. Prompts (several query tokens) and training keep
the fused kernel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from probunlearn.hardware import model_device

NAME = "probunlearn_decode"  # the attention implementation's name in transformers' registry


def decode_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                     shared_prompt=None, **kwargs):
    """A transformers attention function: `query` (rows, heads, q, dim), `key`/`value` (rows,
    kv_heads, positions, dim), `attention_mask` boolean (rows, 1, q, positions), additive, or None.
    Single-token queries outside training take the matrix-product path, the rest transformers' sdpa.

    `shared_prompt` (a `kv_cache.SharedPrompt`, passed to the model's forward call): `key`/`value`
    are then the generated positions only, and the prompt's positions, which come first, are read
    from it, once per prompt for all its rows; `attention_mask` is then not read (the prompts'
    padding is the shared prompt's, the generated positions are all attended)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rows, heads, length, dim = query.shape
    if length != 1 or module.training or kwargs.get("position_bias") is not None:
        if shared_prompt is not None:
            raise RuntimeError("a cache with a shared prompt decodes one token per row and step")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kv_heads = key.shape[1]
    packed = query.reshape(rows, kv_heads, heads // kv_heads, dim)  # query heads of a key/value head as rows
    if query.dtype == torch.float32:
        scores = torch.matmul(packed, key.transpose(-1, -2))
    else:  # in bfloat16, keys x queries then transposed is the faster product on a CPU (benchmarks/README.md)
        scores = torch.matmul(key, packed.transpose(-1, -2)).transpose(-1, -2)
    if shared_prompt is not None:  # scaled in the products, the prompts' padding from shared_prompt: no mask
        scores = torch.cat([shared_prompt.scores(packed, module.layer_idx, scaling), scores.mul_(scaling)], dim=-1)
    else:
        scores = scores * scaling
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        elif attention_mask is not None:
            scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if shared_prompt is None:
        out = torch.matmul(weights, value)  # rows, kv_heads, groups, dim
    else:
        prompt = shared_prompt.length
        out = shared_prompt.weighted(weights[..., :prompt], module.layer_idx) + torch.matmul(weights[..., prompt:], value)
    return out.reshape(rows, 1, heads, dim), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


@contextlib.contextmanager
def switched_attention(model, implementation: str, replaces: Callable[[str], bool]):
    """Within the block, a model on a CPU whose attention implementation `current` has
    `replaces(current)` true computes attention with `implementation`, and with its own again after
    the block (also after an error). On a GPU, or for a model without a switchable attention,
    nothing changes. `decoding_attention` and `models.training_attention` are two such switches."""
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = (current is not None and replaces(current) and model_device(model).type == "cpu"
              and hasattr(model, "set_attn_implementation"))
    if switch:
        model.set_attn_implementation(implementation)
    try:
        yield model
    finally:
        if switch:
            model.set_attn_implementation(current)


def decoding_attention(model):
    """Within the block, a model on a CPU whose attention is transformers' sdpa decodes single
    tokens with `decode_attention`; on a GPU, or with any other attention, nothing changes."""
    _register()
    return switched_attention(model, NAME, lambda current: current == "sdpa")
