"""Tests of probunlearn.sampling (SPEC §5): the sampler draws from exactly the temperature-scaled,
top-p-truncated distribution, is reproducible whatever the batching, and greedy decoding matches
transformers' `generate`; its static loop (`sampling._decode_static`, a GPU's default) draws the same
answers as the prefix-sharing loop, with random numbers made on the device from the host's bits, and
does not wait for the device between its checks. A tiny random float32 Llama with a 64-token character
vocabulary (tests/tiny_lm.py) keeps every test fast and lets chi-square tests see every token often
enough."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from probunlearn import draws, kv_cache, sampling
from probunlearn.models import encode_prompt
from probunlearn.stats import chi_square_p
from probunlearn.temperature import AdaptiveTemperature, ConfidenceTemperature
from tiny_lm import EOS, exact_probs, tiny_model, tiny_tokenizer

P_MIN = 1e-3  # chi-square: seeded, so a pass is deterministic; this level only guards against bugs
QUESTIONS = ["hi", "what is the name of the author?", "where?", "Who wrote it, and when did they do it"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def first_tokens(rows):
    return np.array([r[0] if r else EOS for r in rows])


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_first_and_second_token_follow_the_exact_distribution(model, tokenizer, temperature, top_p):
    question, n = QUESTIONS[1], 4000
    rows = sampling.sample_token_ids(model, tokenizer, [question], num_samples=n, max_new_tokens=2, seed=1,
                                     temperature=temperature, top_p=top_p, progress=False)[0]
    first = first_tokens(rows)
    probs = exact_probs(model, tokenizer, question, temperature=temperature, top_p=top_p)
    assert chi_square_p(np.bincount(first, minlength=64), probs) > P_MIN
    # second step: the conditional distribution after the two most frequent first tokens
    for token in np.argsort(-np.bincount(first, minlength=64))[:2]:
        if token == EOS:
            continue
        second = [r[1] if len(r) > 1 else EOS for r in rows if r and r[0] == token]
        cond = exact_probs(model, tokenizer, question, [int(token)], temperature=temperature, top_p=top_p)
        assert chi_square_p(np.bincount(second, minlength=64), cond) > P_MIN


def test_top_p_never_leaves_the_nucleus(model, tokenizer):
    for question in QUESTIONS[:2]:
        probs = exact_probs(model, tokenizer, question)
        order = np.argsort(-probs)
        before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
        for top_p in (0.05, 0.3, 0.6):
            nucleus = set(order[before < top_p].tolist())
            rows = sampling.sample_token_ids(model, tokenizer, [question], num_samples=500, max_new_tokens=1, seed=2,
                                             top_p=top_p, progress=False)[0]
            assert set(first_tokens(rows).tolist()) <= nucleus
        assert set(first_tokens(rows).tolist()) == nucleus  # and reaches every token of it


def test_temperature_to_zero_equals_greedy(model, tokenizer):
    greedy = sampling.greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=12)
    for temperature in (0.0, 1e-4):
        sampled = sampling.sample_answers(model, tokenizer, QUESTIONS, num_samples=3, temperature=temperature,
                                          max_new_tokens=12, progress=False)
        assert sampled == [[g] * 3 for g in greedy]


def test_greedy_matches_transformers_generate(model, tokenizer):
    greedy = sampling.greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=20, batch_size=3)
    for question, answer in zip(QUESTIONS, greedy):
        ids = torch.tensor([encode_prompt(tokenizer, question)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                             do_sample=False, pad_token_id=0)
        assert answer == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_same_seed_same_answers_whatever_the_batching(model, tokenizer):
    kwargs = dict(num_samples=6, max_new_tokens=8, seed=3, progress=False)
    reference = sampling.sample_token_ids(model, tokenizer, QUESTIONS, **kwargs)
    assert len(reference) == len(QUESTIONS) and all(len(rows) == 6 for rows in reference)
    for batch_size in (1, 7, 1000):
        assert sampling.sample_token_ids(model, tokenizer, QUESTIONS, batch_size=batch_size, **kwargs) == reference
    # other prompts in the batch, another order, and n: answer j to a question stays the same
    other = sampling.sample_token_ids(model, tokenizer, [QUESTIONS[3], "zzz", QUESTIONS[0]], **kwargs)
    assert other[0] == reference[3] and other[2] == reference[0]
    more = sampling.sample_token_ids(model, tokenizer, QUESTIONS[:2], **{**kwargs, "num_samples": 9})
    assert [rows[:6] for rows in more] == reference[:2]
    # another seed gives other answers; samples of one question differ from each other
    assert sampling.sample_token_ids(model, tokenizer, QUESTIONS, **{**kwargs, "seed": 4}) != reference
    assert len({tuple(r) for r in reference[1]}) > 1
    texts = sampling.sample_answers(model, tokenizer, QUESTIONS, **kwargs)
    assert texts == [[tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows] for rows in reference]


def test_greedy_and_sampled_equal_separate_calls(model, tokenizer):
    kwargs = dict(num_samples=5, max_new_tokens=8, seed=2, temperature=0.9, top_p=0.9, progress=False)
    greedy, sampled = sampling.greedy_and_sampled_answers(model, tokenizer, QUESTIONS, batch_size=7, **kwargs)
    assert greedy == sampling.greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=8)
    assert sampled == sampling.sample_answers(model, tokenizer, QUESTIONS, **kwargs)


def test_greedy_decodes_a_bfloat16_model_in_float32_and_leaves_it_as_it_was(tokenizer):
    from probunlearn.models import full_precision, full_precision_changes

    low = tiny_model(seed=3).to(torch.bfloat16)
    before = {k: v.clone() for k, v in low.state_dict().items()}
    exact = tiny_model(seed=3).to(torch.bfloat16).float()  # the same weights, upcast
    greedy = sampling.greedy_answers(low, tokenizer, QUESTIONS, max_new_tokens=10, progress=False)
    assert greedy == sampling.greedy_answers(exact, tokenizer, QUESTIONS, max_new_tokens=10, progress=False)
    for batch_size in (1, 3):  # whatever else shares the batch
        assert sampling.greedy_answers(low, tokenizer, QUESTIONS, max_new_tokens=10, batch_size=batch_size,
                                       progress=False) == greedy
    assert full_precision_changes(low) and not full_precision_changes(exact)
    for decoded in (low, exact):  # apart from the samples (bfloat16) or beside them (float32): the same answers
        both = sampling.greedy_and_sampled_answers(decoded, tokenizer, QUESTIONS, num_samples=3, max_new_tokens=10,
                                                   progress=False)
        assert both[0] == greedy
    with full_precision(low):
        assert {p.dtype for p in low.parameters()} == {torch.float32}
    after = low.state_dict()
    assert all(after[k].dtype == torch.bfloat16 and torch.equal(after[k], v) for k, v in before.items())
    parameter = next(low.parameters())
    with full_precision(low):  # the same Parameter objects (an optimiser holding them keeps working)
        assert next(low.parameters()) is parameter


def test_sample_rows_redraws_exactly_the_chosen_answers(model, tokenizer):
    kwargs = dict(max_new_tokens=8, seed=3, temperature=0.8, progress=False)
    greedy, _ = sampling.greedy_and_sampled_answers(model, tokenizer, QUESTIONS, num_samples=6, **kwargs)
    reference = sampling.sample_token_ids(model, tokenizer, QUESTIONS, num_samples=6, **kwargs)
    rows = [(3, 5), (0, 1), (2, sampling.GREEDY), (0, 4)]
    ids = sampling.sample_rows(model, tokenizer, QUESTIONS, rows, batch_size=3, **kwargs)
    assert ids[0] == reference[3][5] and ids[1] == reference[0][1] and ids[3] == reference[0][4]
    assert sampling.answer_texts(tokenizer, [ids[2]]) == [greedy[2]]
    assert sampling.sample_rows(model, tokenizer, QUESTIONS, [], **kwargs) == []
    with pytest.raises(ValueError, match="rows must be"):
        sampling.sample_rows(model, tokenizer, QUESTIONS, [(len(QUESTIONS), 0)], **kwargs)


def test_step_observer_sees_every_live_row_with_raw_logits_and_chosen_tokens(model, tokenizer):
    seen = []
    observer = lambda q, j, step, logits, rows, tokens: seen.append((q.copy(), j.copy(), step, logits[rows].float(),
                                                                        tokens.clone()))
    ids = sampling.sample_token_ids(model, tokenizer, QUESTIONS, num_samples=5, max_new_tokens=7, seed=1, progress=False,
                                    batch_size=6, step_observer=observer)
    # each row is seen at every step it decoded (len + 1 with EOS, max_new_tokens when cut), with its token
    steps = {}
    for q, j, step, logits, tokens in seen:
        assert logits.shape == (len(q), model.config.vocab_size) and tokens.shape == (len(q),)
        for i, k, token in zip(q, j, tokens.tolist()):
            steps.setdefault((int(i), int(k)), []).append((step, token))
    for i, rows in enumerate(ids):
        for k, row in enumerate(rows):
            taken = [token for _, token in sorted(steps[i, k])]
            assert taken[:len(row)] == row and len(taken) == min(len(row) + 1, 7)
            if len(taken) > len(row):
                assert taken[-1] == EOS


def test_no_row_of_the_forward_pass_is_left_empty(model, tokenizer):
    """Rows whose answers all ended are taken at once by new prefixes or by rows from the end: at
    every step the forward pass ran exactly the rows the live answers draw from."""
    seen = []
    observer = lambda q, j, step, logits, rows, tokens: seen.append((len(logits), sorted(set(rows.tolist()))))
    ids = sampling.sample_token_ids(model, tokenizer, QUESTIONS, num_samples=12, max_new_tokens=10, seed=5, progress=False,
                                    step_observer=observer)
    assert any(0 < len(r) < 9 for rows in ids for r in rows)  # answers ended while others went on
    for ran, used in seen:
        assert used == list(range(ran))


def test_decoding_uses_the_supported_cache_argument(model, tokenizer):
    """transformers 5.24 deprecates `past_key_values` (removed in 5.40): the sampler passes `cache` where the
    model takes it, so decoding raises no FutureWarning of our own."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sampling.sample_token_ids(model, tokenizer, QUESTIONS[:2], num_samples=3, max_new_tokens=4, progress=False)
    expected = "cache" if "cache" in __import__("inspect").signature(type(model).forward).parameters else "past_key_values"
    assert list(kv_cache.cache_argument(model, None)) == [expected]


def test_rows_stop_at_eos_and_respect_max_new_tokens(model, tokenizer):
    rows = sampling.sample_token_ids(model, tokenizer, QUESTIONS, num_samples=50, max_new_tokens=7, seed=0, progress=False)
    lengths = [len(r) for q in rows for r in q]
    assert max(lengths) <= 7 and min(lengths) < 7  # some rows ended early at EOS
    assert all(EOS not in r for q in rows for r in q)


def test_logits_processors_see_raw_scores_and_history(model, tokenizer):
    seen = []

    def ban_letter_e(input_ids, scores):
        seen.append((input_ids.clone(), scores.clone()))
        scores = scores.clone()
        scores[:, tokenizer.convert_tokens_to_ids("e")] = -float("inf")
        return scores

    question = QUESTIONS[0]
    rows = sampling.sample_token_ids(model, tokenizer, [question], num_samples=200, max_new_tokens=4, seed=0,
                                     temperature=0.5, logits_processors=[ban_letter_e], progress=False)[0]
    e = tokenizer.convert_tokens_to_ids("e")
    assert all(e not in r for r in rows)
    prompt = encode_prompt(tokenizer, question)
    first_ids, first_scores = seen[0]
    # one row per distinct prefix: at the first step all 200 answers share the prompt
    assert first_ids.shape == (1, len(prompt)) and (first_ids == torch.tensor(prompt)).all()
    with torch.no_grad():
        raw = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(first_scores[0], raw, atol=1e-5, rtol=1e-5)  # before temperature
    ids, _ = seen[2]  # step 3: the prompt plus two tokens, once per distinct prefix of the live answers
    live = {tuple(r[:2]) for r in rows if len(r) >= 2}
    assert ids.shape[1] == len(prompt) + 2 and ids.shape[0] == len(live) < 200
    assert sorted(map(tuple, ids[:, len(prompt):].tolist())) == sorted(live)


def test_answers_with_the_same_prefix_are_decoded_once(model, tokenizer):
    """Prefix sharing: rows of the forward pass are distinct prefixes. A near-greedy temperature makes
    every sample of a question the same, so each step decodes one row per question, and a row-aware
    processor is told how many answers each row stands for."""
    seen = []

    class Count:
        row_aware = True

        def __call__(self, input_ids, scores, info):
            seen.append((input_ids.shape[0], info.weights.clone()))
            return scores

    ids = sampling.sample_token_ids(model, tokenizer, QUESTIONS[:2], num_samples=50, max_new_tokens=6, seed=0, temperature=1e-6,
                                    logits_processors=[Count()], progress=False)
    assert all(len({tuple(r) for r in rows}) == 1 for rows in ids)  # every sample is the greedy answer
    assert seen[0][0] == 2 and seen[0][1].tolist() == [50, 50]
    assert all(rows <= 2 and int(weights.sum()) <= 100 for rows, weights in seen)
    # plain sampling: prefixes part, the weights still add up to the live answers
    seen.clear()
    ids = sampling.sample_token_ids(model, tokenizer, QUESTIONS[:2], num_samples=50, max_new_tokens=6, seed=0,
                                    logits_processors=[Count()], progress=False)
    live_at = lambda step: sum(len(r) >= step for rows in ids for r in rows)  # answers decoding step `step`
    assert [int(w.sum()) for _, w in seen] == [live_at(step) for step in range(len(seen))]
    assert seen[3][0] > 2


def test_a_shared_prompt_gives_the_same_answers_and_holds_each_prompt_once(model, tokenizer, monkeypatch):
    """With several answers per question the batch keeps each prompt's keys and values once
    (kv_cache.SharedPrompt) and its rows' buffers hold generated positions only; the answers are
    those of a cache where every row holds its prompt (float32: bit for bit)."""
    made = []
    original = kv_cache.SharedPrompt.__init__
    monkeypatch.setattr(kv_cache.SharedPrompt, "__init__", lambda self, *a: made.append(self) or original(self, *a))
    kwargs = dict(num_samples=7, max_new_tokens=9, seed=5, progress=False)
    shared = sampling.sample_token_ids(model, tokenizer, QUESTIONS, batch_size=10, **kwargs)
    assert len(made) == 3  # batches of 10, 10 and 8 answers: each holds >= 4 answers per prompt
    prompts = [len(encode_prompt(tokenizer, q)) for q in QUESTIONS]
    assert made[0].prompts == 2 and made[0].length == max(prompts[:2])
    assert made[0].layers[0][0].shape[:3] == (2, model.config.num_key_value_heads, max(prompts[:2]))
    monkeypatch.setattr(sampling, "SHARED_PROMPT_ROWS", 10**9)  # every row holds its prompt (as on a GPU)
    assert sampling.sample_token_ids(model, tokenizer, QUESTIONS, batch_size=10, **kwargs) == shared
    assert len(made) == 3
    # greedy decoding (one answer per prompt) never shares
    sampling.greedy_answers(model, tokenizer, QUESTIONS, max_new_tokens=4, progress=False)
    assert len(made) == 3


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=2.5), "num_samples"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=-1), "seed"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments_raise(model, tokenizer, kwargs, message):
    arguments = {**dict(num_samples=2, max_new_tokens=3, progress=False), **kwargs}
    with pytest.raises(ValueError, match=message):
        sampling.sample_answers(model, tokenizer, QUESTIONS, **arguments)


def test_bad_questions_raise(model, tokenizer):
    with pytest.raises(ValueError, match="list"):
        sampling.sample_answers(model, tokenizer, "a single question", num_samples=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="list"):
        sampling.greedy_answers(model, tokenizer, "a single question", max_new_tokens=3)
    assert sampling.sample_answers(model, tokenizer, [], num_samples=2, max_new_tokens=3) == []


# ----------------------------------------------------------------------------- the static loop (GPUs)


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
            prompts = [encode_prompt(tokenizer, q) for q in questions]
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_lora_computes_peft_s_numbers_bit_for_bit_and_the_sampler_decodes_in_it(tokenizer, dtype, monkeypatch):
    import contextlib
    import copy

    from peft.tuners.lora.layer import Linear as LoraLinear

    from probunlearn.models import add_lora, lean_lora
    from tiny_unlearning import perturb_adapter

    peft_model = add_lora(copy.deepcopy(tiny_model()).to(dtype), r=4, lora_alpha=8).eval()
    perturb_adapter(peft_model)  # a nonzero update: the adapter changes the logits
    layers = [m for m in peft_model.modules() if type(m) is LoraLinear]
    # peft keeps the adapter in float32 beside bfloat16 weights: the lean forward casts as peft's does
    assert {m.lora_A["default"].weight.dtype for m in layers} == {torch.float32}
    ids = torch.tensor([encode_prompt(tokenizer, q)[:6] for q in QUESTIONS])
    with torch.no_grad():
        plain = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            assert not torch.equal(peft_model(input_ids=ids).logits, plain)
        with lean_lora(peft_model):
            assert layers and all("forward" in vars(m) for m in layers)  # every LoRA layer runs lean
            lean = peft_model(input_ids=ids).logits
        assert not any("forward" in vars(m) for m in layers)  # peft's own forward again after the block
    assert torch.equal(lean, plain)
    sample = partial(sampling.sample_token_ids, peft_model, tokenizer, QUESTIONS, num_samples=6, max_new_tokens=8,
                     seed=3, progress=False)
    seen = []
    monkeypatch.setattr(sampling, "lean_lora", lambda m: seen.append(m) or lean_lora(m))
    fast = sample()
    assert seen  # the sampler decoded inside it
    monkeypatch.setattr(sampling, "lean_lora", lambda m: contextlib.nullcontext(m))
    assert sample() == fast  # and drew the same answers as with peft's forward
