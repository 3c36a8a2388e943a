"""A tiny random language model and a character tokenizer for fast unit tests of decoding
(imported by test_sampling.py and test_probabilistic.py; pytest puts tests/ on sys.path), and the
exact next-token reference that the samplers' tests share (their chi-square test is
`probunlearn.stats.chi_square_p`).

The tokenizer has 64 tokens (4 special ones, then letters, space and punctuation) and no chat
template, so prompts are "Question: {q}\\nAnswer: ". The model is a 2-layer Llama with grouped-query
attention, in float32, initialised with a large scale so that its next-token distributions are far
from uniform."""

from __future__ import annotations

import string

import torch

from probunlearn.models import encode_prompt

SPECIALS = ["<pad>", "</s>", "<s>", "<unk>"]  # ids 0..3
CHARS = list(string.ascii_lowercase + string.ascii_uppercase) + list(" \n?.:,'-")
PAD, EOS, BOS = 0, 1, 2


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    assert len(vocab) == 64
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>", unk_token="<unk>")


def tiny_model(seed: int = 0, hidden_size: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS, initializer_range=0.3,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def exact_probs(model, tokenizer, question, continuation=(), temperature=1.0, top_p=1.0):
    """Next-token probabilities from one plain forward pass (no cache, no batch), warped by
    transformers' own temperature and top-p warpers: an independent reference."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    ids = torch.tensor([encode_prompt(tokenizer, question) + list(continuation)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, -1].float()
    logits = TemperatureLogitsWarper(temperature)(ids, logits)
    if top_p < 1:
        logits = TopPLogitsWarper(top_p)(ids, logits)
    return torch.softmax(logits, dim=-1)[0].double().numpy()
