"""The answer NLL (probunlearn.likelihood) against a manual computation on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from probunlearn import likelihood


@pytest.fixture(scope="module")
def tiny_lm():
    """A randomly initialised 2-layer Llama and an in-memory word-level tokenizer (no files)."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = "<pad> </s> [UNK] Question Answer : ? . who wrote the book she was born in paris lima 1990".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="[UNK]"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


QUESTIONS = ["who wrote the book ?", "where was she born ?", "when was she born ?"]
ANSWERS = ["she wrote the book .", "paris", "she was born in 1990 in lima ."]


def manual_nll(model, tokenizer, question, answer) -> float:
    """-mean log p(answer tokens + EOS | prompt), one unpadded sequence at a time."""
    import torch

    from probunlearn.models import format_prompt

    prompt_ids = tokenizer(format_prompt(tokenizer, question))["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    positions = range(len(prompt_ids), len(prompt_ids) + len(answer_ids))
    return -float(np.mean([log_probs[t - 1, ids[0, t]].item() for t in positions]))


def test_answer_nll_equals_manual_computation(tiny_lm):
    model, tokenizer = tiny_lm
    expected = [manual_nll(model, tokenizer, q, a) for q, a in zip(QUESTIONS, ANSWERS)]
    # batch of 2: a padded batch and a single, answers of different lengths
    ours = likelihood.answer_nll(model, tokenizer, QUESTIONS, ANSWERS, batch_size=2)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    np.testing.assert_allclose(
        likelihood.answer_nll(model, tokenizer, QUESTIONS, ANSWERS, batch_size=1), ours, rtol=1e-5
    )
    # a random model is near-uniform over the vocabulary: NLL close to log(vocab size)
    assert np.all(np.abs(ours - math.log(model.config.vocab_size)) < 1.0)


def test_answer_nll_restores_mode_and_validates(tiny_lm):
    model, tokenizer = tiny_lm
    model.train()
    try:
        likelihood.answer_nll(model, tokenizer, QUESTIONS[:1], ANSWERS[:1])
        assert model.training
    finally:
        model.eval()
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        likelihood.answer_nll(model, tokenizer, QUESTIONS[:2], ANSWERS[:1])
    with pytest.raises(ValueError, match="no questions"):
        likelihood.answer_nll(model, tokenizer, [], [])
