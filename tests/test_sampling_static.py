"""The static decoding loop (`sampling._decode_static`, a GPU's default): the same answers as the
prefix-sharing loop, random numbers made on the device with the host's bits, and no wait for the
device between its checks. Tiny random float32 Llama (tests/tiny_lm.py), on the CPU."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from probunlearn import draws, sampling
from probunlearn.temperature import AdaptiveTemperature, ConfidenceTemperature
from tiny_lm import tiny_model, tiny_tokenizer

QUESTIONS = ["hi", "what is the name of the author?", "where?", "Who wrote it, and when did they do it"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_device_noise_has_the_hosts_random_bits_and_its_noise_to_rounding():
    keys = draws.row_keys(3, QUESTIONS * 40, list(range(160)))
    for step in (0, 7, 63):
        width = 193 + draws.RACE_BLOCK
        counters = np.arange(step * width + 1, (step + 1) * width + 1, dtype=np.uint64)
        with np.errstate(over="ignore"):
            host = draws._splitmix64(keys[:, None] + counters[None, :] * draws.GAMMA)
        device = draws.race_bits_on_device(draws.device_keys(keys, "cpu"), step, width)
        assert np.array_equal(device.numpy().view(np.uint64), host)  # the same SplitMix64 outputs, bit for bit
        for a, b in zip(draws.race_noise(keys, step, 193), draws.race_noise_on_device(draws.device_keys(keys, "cpu"), step, 193)):
            np.testing.assert_allclose(b.numpy(), a, rtol=4e-16, atol=0)  # one logarithm's rounding at most


def test_sorted_nucleus_floor_is_the_candidates_floor():
    generator = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(12, 5000, generator=generator) * torch.linspace(0.1, 8, 12)[:, None], dim=-1)
    for top_p in (0.05, 0.5, 0.9, 0.999):
        assert torch.equal(draws.sorted_nucleus_floor(probs, top_p), draws.nucleus_floor(probs, top_p))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8), (0.0, 1.0)])
def test_the_static_loop_draws_the_prefix_loops_answers(model, tokenizer, temperature, top_p):
    kwargs = dict(num_samples=12, max_new_tokens=10, seed=5, temperature=temperature, top_p=top_p, progress=False)
    prefix = sampling.sample_token_ids(model, tokenizer, QUESTIONS, loop="prefix", **kwargs)
    for batch_size in (5, 1000):
        assert sampling.sample_token_ids(model, tokenizer, QUESTIONS, loop="static", batch_size=batch_size,
                                         **kwargs) == prefix
    # greedy rows beside samples (`sample_rows` with GREEDY), and answers cut at max_new_tokens
    rows = [(i, j) for i in range(len(QUESTIONS)) for j in (sampling.GREEDY, 0, 3)]
    both = {loop: sampling.sample_rows(model, tokenizer, QUESTIONS, rows, max_new_tokens=10, seed=5, temperature=0.9,
                                       progress=False, loop=loop) for loop in ("prefix", "static")}
    assert both["static"] == both["prefix"] and any(len(ids) == 10 for ids in both["prefix"])


def test_the_static_loop_gives_processors_the_same_answers_and_counts(model, tokenizer):
    def ban_letter_e(input_ids, scores):
        scores = scores.clone()
        scores[:, tokenizer.convert_tokens_to_ids("e")] = -float("inf")
        return scores

    ids, counts = {}, {}
    for loop in ("prefix", "static"):
        confidence, entropy = ConfidenceTemperature(0.5), AdaptiveTemperature(2.2)
        ids[loop] = sampling.sample_token_ids(model, tokenizer, QUESTIONS, num_samples=16, max_new_tokens=40, seed=1,
                                              logits_processors=[ban_letter_e, entropy, confidence], progress=False,
                                              loop=loop)
        counts[loop] = [(p.fired, p.steps) for p in (confidence, entropy)]
    assert ids["static"] == ids["prefix"]
    assert 0 < sum(len(r) < 40 for rows in ids["prefix"] for r in rows) < 64  # some answers end before the others
    assert all(tokenizer.convert_tokens_to_ids("e") not in r for rows in ids["static"] for r in rows)
    # the processors count the live answers only: rows that ended weigh 0 in the static loop
    assert counts["static"] == counts["prefix"] and all(0 < fired < steps for fired, steps in counts["prefix"])


class HostWaits(TorchFunctionMode):
    """Counts, outside the model's forward calls, the operations that make the host wait for a GPU:
    reading a value (bool, item, tolist, numpy, a copy to the CPU), and operations whose output size
    depends on the data (nonzero, unique, boolean-mask indexing, masked_select)."""

    READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu,
             torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.nonzero, torch.Tensor.nonzero,
             torch.unique, torch.Tensor.unique, torch.masked_select, torch.Tensor.masked_select, torch.argwhere}

    def __init__(self):
        super().__init__()
        self.waits, self.inside = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.inside:
            boolean_index = func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
            if func in self.READS or boolean_index:
                self.waits.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def _count_waits(model, tokenizer, loop, max_new_tokens, top_p=1.0):
    recorder = HostWaits()

    def enter(module, args, kwargs):
        recorder.inside += 1

    def leave(module, args, kwargs, output):
        recorder.inside -= 1

    handles = [model.register_forward_pre_hook(enter, with_kwargs=True),
               model.register_forward_hook(leave, with_kwargs=True)]
    questions = QUESTIONS[:2]
    try:
        # a high temperature keeps most answers going to max_new_tokens: every step is decoded
        with recorder:
            keys = draws.row_keys(0, [q for q in questions for _ in range(8)], list(range(8)) * len(questions))
            prompts = [sampling.encode_prompt(tokenizer, q) for q in questions]
            # the static loop with its random numbers made by torch, as on a GPU
            decode = partial(sampling._decode_static, device_noise=True) if loop == "static" else sampling._decode
            ids = decode(model, tokenizer, prompts, [i for i in range(len(questions)) for _ in range(8)], keys,
                         np.zeros(len(keys), bool), max_new_tokens=max_new_tokens, temperature=5.0, top_p=top_p,
                         logits_processors=[], eos_ids=[tokenizer.eos_token_id], on_step=lambda done: None)
    finally:
        for handle in handles:
            handle.remove()
    return recorder.waits, ids


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_static_loop_waits_for_the_device_only_at_its_checks(model, tokenizer, top_p):
    steps = 24
    static, ids = _count_waits(model, tokenizer, "static", steps, top_p)
    checks = math.ceil(steps / sampling.STATIC_CHECK_EVERY)
    # a read of how many answers ended per check; at the end the invalid-row check, the tokens' copy to the
    # host and two lists
    assert sorted(static) == sorted(["__int__"] * checks + ["__bool__", "cpu", "tolist", "tolist"]), static
    assert len(static) <= steps // 4 + 4  # far fewer than one per step
    # the prefix loop reads values from the device at every step (its rows depend on the tokens drawn)
    prefix, prefix_ids = _count_waits(model, tokenizer, "prefix", steps, top_p)
    assert len(prefix) >= 3 * steps
    # torch's random numbers (a logarithm's rounding from numpy's) draw the same answers here
    assert ids == prefix_ids and sum(map(len, ids)) > steps * len(ids) // 2


def test_loop_is_checked(model, tokenizer):
    with pytest.raises(ValueError, match="loop must be one of"):
        sampling.sample_token_ids(model, tokenizer, QUESTIONS, num_samples=2, max_new_tokens=2, loop="fast",
                                  progress=False)
    with pytest.raises(ValueError, match="step observer"):
        sampling.sample_token_ids(model, tokenizer, QUESTIONS, num_samples=2, max_new_tokens=2, loop="static",
                                  step_observer=lambda *a: None, progress=False)
