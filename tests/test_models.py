"""The embedded model (GGUF conversion + cache), prompts, answer-only labels, LoRA, adapters (probunlearn.models)."""

import time

import pytest
import torch

from probunlearn import answers, hardware, models
from probunlearn.authors import fictitious_authors
from probunlearn.models import (AnswerOnlyCollator, add_lora, encode_answer, encode_prompt, encode_qa, format_prompt,
                                load_model, load_tokenizer, reference_model, save_adapter)
from probunlearn.sampling import greedy_answers
from probunlearn.training import train_lora


def _tiny_data():
    return fictitious_authors(1, qa_per_author=4, seed=7)


@pytest.fixture(scope="module")
def base():
    return load_model(dtype=torch.float32)


def test_gguf_conversion_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBUNLEARN_CACHE", str(tmp_path))
    first = models.embedded_model_dir()
    assert (first / "model.safetensors").stat().st_size > 400e6  # 135 M fp32 weights
    stamp = (first / "model.safetensors").stat().st_mtime
    start = time.perf_counter()
    again = models.embedded_model_dir()
    assert again == first and (first / "model.safetensors").stat().st_mtime == stamp  # not converted twice
    assert time.perf_counter() - start < 1.0
    model, tokenizer = load_model(device="cpu")
    assert model.dtype == hardware.default_dtype("cpu")
    assert "Paris" in greedy_answers(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]


def test_prompt_uses_the_chat_template(base):
    _, tokenizer = base
    prompt = format_prompt(tokenizer, "Where was Ada born?")
    assert prompt.endswith("<|im_start|>assistant\n") and "Where was Ada born?" in prompt
    # an empty system turn instead of SmolLM2's default one (16 tokens shorter)
    assert prompt.startswith("<|im_start|>system\n<|im_end|>") and "SmolLM" not in prompt
    default = format_prompt(tokenizer, "Where was Ada born?", system_prompt=None)
    assert "You are a helpful AI assistant named SmolLM" in default
    assert len(tokenizer(default)["input_ids"]) - len(encode_prompt(tokenizer, "Where was Ada born?")) == 16


def test_lora_on_the_top_layers_only_and_the_answer_only_loss(base):
    model, tokenizer = load_model(dtype=torch.float32)
    model = add_lora(model, r=4, lora_alpha=8, top_layers=5)
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
    assert layers == set(range(25, 30))
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear
    batch = encode_qa(tokenizer, *zip(*[(r["question"], r["answer"]) for r in _tiny_data()]))
    with torch.no_grad():
        assert answers.answer_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        trunk = answers.FrozenTrunk(model)
        assert trunk.enabled and trunk.first == 25
        assert answers.answer_loss(model, batch, trunk).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="top_layers"):
        add_lora(load_model(dtype=torch.float32)[0], top_layers=31)


def test_plain_prompt_without_chat_template(base):
    _, tokenizer = base
    plain = load_tokenizer()
    plain.chat_template = None
    assert format_prompt(plain, "Why?") == "Question: Why?\nAnswer: "
    assert tokenizer.chat_template  # the fixture's tokenizer is untouched


def test_labels_cover_answer_tokens_only(base):
    _, tokenizer = base
    questions = ["Where was Ada born?", "Who?"]
    answers = ["Ada was born in Quillhaven.", "A very much longer answer than the first one, to force padding."]
    batch = encode_qa(tokenizer, questions, answers)
    for i, (q, a) in enumerate(zip(questions, answers)):
        prompt, answer = encode_prompt(tokenizer, q), encode_answer(tokenizer, a)
        labels = batch["labels"][i]
        assert (labels[: len(prompt)] == -100).all()
        assert labels[len(prompt): len(prompt) + len(answer)].tolist() == answer
        assert (labels[len(prompt) + len(answer):] == -100).all()  # padding
        assert int(batch["attention_mask"][i].sum()) == len(prompt) + len(answer)
        assert tokenizer.decode(answer, skip_special_tokens=True) == a
    collated = AnswerOnlyCollator(tokenizer)([{"question": q, "answer": a} for q, a in zip(questions, answers)])
    assert torch.equal(collated["labels"], batch["labels"])
    with pytest.raises(ValueError, match="questions but"):
        encode_qa(tokenizer, questions, answers[:1])


def test_training_attention_is_eager_inside_and_gives_the_same_loss_and_gradients():
    model, tokenizer = load_model(dtype=torch.float32)
    data = _tiny_data()
    batch = AnswerOnlyCollator(tokenizer, None)([data[i] for i in range(4)])
    model = add_lora(model, r=4, lora_alpha=8)
    assert model.config._attn_implementation == "sdpa"

    def loss_and_grad():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grad = next(p.grad for p in model.parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0)
        return float(loss.detach()), grad.clone()

    fused = loss_and_grad()
    with models.training_attention(model):
        assert model.config._attn_implementation == "eager"
        eager = loss_and_grad()
    assert model.config._attn_implementation == "sdpa"  # restored for decoding
    assert eager[0] == pytest.approx(fused[0], abs=1e-4)
    torch.testing.assert_close(eager[1], fused[1], rtol=1e-3, atol=1e-5)


def test_saved_adapter_on_a_local_base_is_found_by_relative_path(tmp_path):
    model, tokenizer = load_model(dtype=torch.float32)
    model = add_lora(model, r=4, lora_alpha=8)
    save_adapter(model, tmp_path / "models" / "first", base="smollm2-135m")
    chained, _ = load_model(tmp_path / "models" / "first", dtype=torch.float32)
    chained = add_lora(chained, r=4, lora_alpha=8)
    path = save_adapter(chained, tmp_path / "models" / "second", base=tmp_path / "models" / "first")
    assert '"../first"' in (path / "probunlearn.json").read_text()
    moved = tmp_path / "elsewhere"
    (tmp_path / "models").rename(moved)
    loaded, _ = load_model(moved / "second", dtype=torch.float32)
    assert loaded.dtype == torch.float32


def test_an_unlearned_model_loads_as_trained_and_a_fine_tuned_one_merged(tiny, tmp_path):
    """An adapter on a saved adapter (an unlearned model on the target) stays beside the weights:
    the loaded model computes exactly what the trained one did. Merged into bfloat16 weights, a
    small update mostly rounds away."""
    first = add_lora(load_model(tiny["path"], dtype=torch.bfloat16)[0], r=4, lora_alpha=8)
    with torch.no_grad():
        for name, param in first.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    save_adapter(first, tmp_path / "target", base=tiny["path"])
    assert models.merges_by_default(tmp_path / "target")
    target, _ = load_model(tmp_path / "target", dtype=torch.bfloat16)
    assert not hasattr(target, "peft_config")  # fine-tuned: merged, the target every notebook reads
    unlearned = add_lora(target, r=4, lora_alpha=8)
    with torch.no_grad():
        for name, param in unlearned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)  # a small update, like a mixed model's
    path = save_adapter(unlearned, tmp_path / "unlearned", base=tmp_path / "target")
    assert not models.merges_by_default(path)
    ids = torch.tensor([[5, 9, 13, 20, 31, 40]])
    with torch.no_grad():
        trained = unlearned(input_ids=ids).logits
        loaded, _ = load_model(path, dtype=torch.bfloat16)
        assert hasattr(loaded, "peft_config")
        assert torch.equal(loaded(input_ids=ids).logits, trained)
        merged, _ = load_model(path, dtype=torch.bfloat16, merge=True)
        assert not hasattr(merged, "peft_config")
        assert not torch.equal(merged(input_ids=ids).logits, trained)


def test_clear_errors():
    with pytest.raises(ValueError, match="quantization"):
        load_model(quantization="8bit")
    with pytest.raises(OSError, match="smollm2-135m"):
        load_model("no-such-org/no-such-model")  # the hub is offline in tests (conftest)
    model, _ = load_model()
    with pytest.raises(TypeError, match="add_lora"):
        with reference_model(model):
            pass
    with pytest.raises(ValueError, match="add_lora"):
        train_lora(model, None, _tiny_data(), epochs=1, learning_rate=1e-3, batch_size=2, progress=False)


def test_merge_adapter_drops_the_stale_onednn_packs():
    """peft merges into weight.data in place; a oneDNN layer that ran before must not keep its old packed copy."""
    import torch

    from probunlearn.hardware import OneDNNLinear, use_onednn
    from probunlearn.models import add_lora, merge_adapter
    from tiny_lm import tiny_model

    model = use_onednn(tiny_model())
    assert any(isinstance(m, OneDNNLinear) for m in model.modules())
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    with torch.no_grad():
        before = model(input_ids=ids).logits  # packs the weights
        peft_model = add_lora(model, r=4, lora_alpha=8)
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        with_adapter = peft_model(input_ids=ids).logits
        merged = merge_adapter(peft_model)
        after = merged(input_ids=ids).logits
    assert not torch.allclose(with_adapter, before, atol=1e-3)
    torch.testing.assert_close(after, with_adapter, atol=1e-4, rtol=1e-4)
