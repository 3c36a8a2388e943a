"""Tests of probunlearn.attention: the decoding attention computes what transformers' eager attention
computes (grouped query heads, padding masks), the model switches to it only inside the block and
only for single-token steps, and a tiny model's decoding logits do not change."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from probunlearn import attention, kv_cache
from probunlearn.models import encode_prompt
from tiny_lm import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def module(heads=6, kv_heads=2, training=False):
    return types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=training, is_causal=True)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_decode_attention_equals_eager_attention(mask_kind):
    gen = torch.Generator().manual_seed(0)
    rows, heads, kv_heads, positions, dim, capacity = 5, 6, 2, 11, 8, 16
    query = torch.randn(rows, heads, 1, dim, generator=gen)
    # keys and values as the cache hands them over: a view of a longer buffer
    key = torch.randn(rows, kv_heads, capacity, dim, generator=gen)[:, :, :positions]
    value = torch.randn(rows, kv_heads, capacity, dim, generator=gen)[:, :, :positions]
    padding = torch.arange(positions)[None, :] >= torch.tensor([0, 3, 0, 7, 1])[:, None]  # left padding per row
    mask = {"none": None, "bool": padding[:, None, None, :],
            "additive": torch.zeros(rows, 1, 1, positions).masked_fill(~padding[:, None, None, :], -1e9)}[mask_kind]
    eager_mask = None if mask is None else (mask if mask.dtype != torch.bool else
                                            torch.zeros(mask.shape).masked_fill(~mask, float("-inf")))
    ours, _ = attention.decode_attention(module(), query, key, value, mask, scaling=dim**-0.5)
    expected, _ = eager_attention_forward(module(), query, key, value, eager_mask, scaling=dim**-0.5)
    assert ours.shape == expected.shape == (rows, 1, heads, dim)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    if mask is not None:  # the mask matters: without it row 3 attends to its 7 padded positions
        unmasked, _ = attention.decode_attention(module(), query, key, value, None, scaling=dim**-0.5)
        assert (unmasked[3] - ours[3]).abs().max() > 1e-3


def test_prompts_and_training_keep_the_fused_kernel(monkeypatch):
    from transformers.integrations import sdpa_attention

    calls = []
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: calls.append(a[1].shape) or (None, None))
    q, kv = torch.zeros(2, 6, 3, 8), torch.zeros(2, 2, 3, 8)
    attention.decode_attention(module(), q, kv, kv, None, scaling=1.0)  # a prompt: 3 query tokens
    attention.decode_attention(module(training=True), q[:, :, :1], kv, kv, None, scaling=1.0)
    assert calls == [(2, 6, 3, 8), (2, 6, 1, 8)]


def decode_logits(model, tokenizer, questions, steps=3):
    """Logits of a few greedy decoding steps after left-padded prompts, with the sampler's cache."""
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = kv_cache.kv_cache(width + steps)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **kv_cache.cache_argument(model, cache))
    logits, pos = [out.logits[:, -1]], positions[:, -1:] + 1
    for _ in range(steps):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        out = model(input_ids=logits[-1].argmax(-1, keepdim=True), attention_mask=mask, position_ids=pos,
                    use_cache=True, **kv_cache.cache_argument(model, cache))
        logits.append(out.logits[:, -1])
        pos = pos + 1
    return torch.stack(logits)


@torch.inference_mode()
def test_a_model_decodes_the_same_logits_inside_the_block(monkeypatch):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads < 4
    questions = ["hi", "what is the name of the author?", "where?"]  # different lengths: padded rows
    reference = decode_logits(model, tokenizer, questions)
    calls = []
    decode = attention.decode_attention
    monkeypatch.setattr(attention, "decode_attention", lambda *a, **k: calls.append(a[1].shape[2]) or decode(*a, **k))
    with attention.decoding_attention(model):
        assert model.config._attn_implementation == attention.NAME
        ours = decode_logits(model, tokenizer, questions)
    assert model.config._attn_implementation == "sdpa"
    assert sorted(set(calls)) == [1, max(len(encode_prompt(tokenizer, q)) for q in questions)]
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_a_shared_prompt_decodes_the_logits_of_a_cache_with_every_row_holding_it():
    """kv_cache.SharedPrompt: rows continue prompts in any order (copied, dropped, several per
    prompt, one prompt with none); the logits are those of a cache where each row holds its prompt."""
    model, tokenizer = tiny_model(), tiny_tokenizer()
    questions = ["hi", "what is the name of the author?", "where?"]
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    row_prompt = torch.tensor([0, 1, 2])
    # (rows held, targets, sources) for `place_rows`, or a list of rows for `keep_rows`
    steps = [(6, [3, 4, 5], [1, 1, 0]), [0, 1, 3, 4, 5], (9, [5, 6, 7, 8], [4, 4, 4, 4]), (8, [0], [8]),
             (8, [2, 5], [5, 2])]
    logits = {}
    with attention.decoding_attention(model):
        for shared in (False, True):
            cache = kv_cache.kv_cache(width if shared else width + len(steps), row_capacity=16)
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **kv_cache.cache_argument(model, cache))
            prompt = kv_cache.SharedPrompt(cache, len(steps), 16, mask) if shared else None
            rows, pos, seen = row_prompt, positions[:, -1], []
            token = out.logits[:, -1].argmax(-1)
            for step, change in enumerate(steps):
                index = moved_rows(change)
                for layer in cache.layers:
                    layer.keep_rows(index) if isinstance(change, list) else place(layer, change)
                rows, pos, token = rows[index], pos[index], token[index]
                pos = pos + 1
                step_mask = torch.cat([mask[rows], torch.ones(len(rows), step + 1, dtype=torch.long)], dim=1)
                extra = {}
                if shared:  # no mask: the prompts' padding is the shared prompt's, as the sampler runs it
                    prompt.set_rows(rows)
                    extra, step_mask = {"shared_prompt": prompt}, None
                out = model(input_ids=token[:, None], attention_mask=step_mask, position_ids=pos[:, None],
                            use_cache=True, **kv_cache.cache_argument(model, cache), **extra)
                token = out.logits[:, -1].argmax(-1)
                seen.append(out.logits[:, -1])
            logits[shared] = seen
            assert cache.get_seq_length() == width + len(steps)
    assert rows.tolist() == [0, 1, 0, 1, 0, 1, 0, 0]  # prompt 2 lost its rows, prompt 0 has five
    for plain, shared in zip(logits[False], logits[True]):
        torch.testing.assert_close(shared, plain, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="one token"):
        attention.decode_attention(module(), torch.zeros(2, 6, 3, 8), torch.zeros(2, 2, 3, 8),
                                   torch.zeros(2, 2, 3, 8), None, scaling=1.0, shared_prompt=prompt)


@pytest.mark.parametrize("split", [False, True])
def test_the_cache_keeps_each_rows_positions_through_row_copies_drops_and_growth(split):
    """A `kv_cache` layer's keys and values, row-major as allocated or position-major after
    `split_prompt` (the generated positions of a shared prompt), are those written for each row,
    through `place_rows` (rows added, also past the row room, which grows; rows moved into others,
    swapped, dropped), `keep_rows` and later writes."""
    gen = torch.Generator().manual_seed(0)
    heads, dim = 2, 4
    cache = kv_cache.kv_cache(7, row_capacity=3)
    written = torch.randn(2, heads, 2, dim, generator=gen)  # two rows, two positions
    cache.update(written, -written, 0)
    layer = cache.layers[0]
    if split:
        prompt, _ = layer.split_prompt(capacity=6, row_capacity=3)
        assert torch.equal(prompt, written) and layer.position_major and layer.keys.shape[2] == 0
        written = torch.randn(2, heads, 1, dim, generator=gen)
        layer.update(written, -written)
    expected = written
    changes = [(6, [2, 3, 4, 5], [1, 0, 1, 1]), [5, 0, 2], (8, [3, 4, 5, 6, 7], [2, 2, 2, 2, 1]),
               (4, [0, 2], [6, 7]), (4, [1, 3], [3, 1])]
    for change in changes:
        index = moved_rows(change)
        layer.keep_rows(index) if isinstance(change, list) else place(layer, change)
        expected = expected[index]
        step = torch.randn(len(expected), heads, 1, dim, generator=gen)
        layer.update(step, -step)
        expected = torch.cat([expected, step], dim=2)
        assert torch.equal(layer.keys, expected) and torch.equal(layer.values, -expected)
        if len(expected) == 8:
            assert layer._keys.shape[int(split)] >= 8  # grown past the room of 3 rows
    assert layer.rows == 4
    assert layer.get_seq_length() == 2 + split + 5  # the prompt, one position after its split, five steps


def place(layer, change) -> None:
    """`layer.place_rows(rows, targets, sources)` for change = (rows held, targets, sources) as lists."""
    rows, targets, sources = change
    layer.place_rows(rows, torch.tensor(targets), torch.tensor(sources))


def moved_rows(change) -> torch.Tensor:
    """The earlier row that each row holds after `keep_rows(change)` (a list) or
    `place_rows(*change)` (rows held, targets, sources)."""
    if isinstance(change, list):
        return torch.tensor(change)
    rows, targets, sources = change
    origin = torch.arange(rows)
    origin[targets] = torch.tensor(sources)
    return origin


def test_the_block_restores_the_attention_after_an_error():
    model = tiny_model()
    with pytest.raises(RuntimeError), attention.decoding_attention(model):
        raise RuntimeError("stop")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")  # another attention: left alone
    with attention.decoding_attention(model):
        assert model.config._attn_implementation == "eager"
