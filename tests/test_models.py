"""The embedded model (GGUF conversion + cache), prompts, answer-only labels, LoRA / QLoRA, adapters."""

import time

import pytest
import torch

from probunlearn import models
from probunlearn.data import fictitious_authors
from probunlearn.models import (AnswerOnlyCollator, add_lora, encode_answer, encode_prompt, encode_qa,
                                format_prompt, load_model, load_tokenizer, reference_model, save_adapter)
from probunlearn.sampling import greedy_answers
from probunlearn.training import finetune, train_lora


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
    assert model.dtype == models.default_dtype("cpu")
    assert "Paris" in greedy_answers(model, tokenizer, ["What is the capital of France?"], max_new_tokens=12)[0]


def test_cpu_dtype_is_bfloat16_only_where_it_is_native_and_faster(monkeypatch):
    monkeypatch.delenv("PROBUNLEARN_DTYPE", raising=False)
    choices = {}
    for kind, speedup in (("none", 9.0), ("amx", 0.1), ("native", 1.8), ("native", 0.55)):
        monkeypatch.setattr(models, "_cpu_bf16_kind", lambda kind=kind: kind)
        monkeypatch.setattr(models, "bf16_speedup", lambda speedup=speedup: speedup)
        choices[kind, speedup] = models.default_dtype("cpu")
    assert choices == {("none", 9.0): torch.float32, ("amx", 0.1): torch.bfloat16,
                       ("native", 1.8): torch.bfloat16, ("native", 0.55): torch.float32}
    monkeypatch.setenv("PROBUNLEARN_DTYPE", "float32")  # the override wins
    assert models.default_dtype("cpu") == torch.float32


def test_bf16_speedup_is_measured_once_per_cpu_and_kept(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("PROBUNLEARN_CACHE", str(tmp_path))
    models.bf16_speedup.cache_clear()
    try:
        measured = models.bf16_speedup()
        table = json.loads((tmp_path / "cpu_bf16.json").read_text())
        assert list(table) == [models._cpu_key()] and table[models._cpu_key()] == pytest.approx(measured, abs=1e-3)
        assert measured > 0
        table[models._cpu_key()] = 7.5  # a later process reads the kept number instead of measuring again
        (tmp_path / "cpu_bf16.json").write_text(json.dumps(table))
        models.bf16_speedup.cache_clear()
        assert models.bf16_speedup() == 7.5
    finally:
        models.bf16_speedup.cache_clear()


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
        assert models.answer_loss(model, batch).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        trunk = models.FrozenTrunk(model)
        assert trunk.enabled and trunk.first == 25
        assert models.answer_loss(model, batch, trunk).item() == pytest.approx(model(**batch).loss.item(), rel=1e-5)
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


def _tiny_data():
    return fictitious_authors(1, qa_per_author=4, seed=7)


def _loss(model, tokenizer, data):
    batch = encode_qa(tokenizer, data["question"], data["answer"])
    with torch.no_grad():
        return model(**batch).loss.item()


def test_lora_steps_lower_the_loss_and_adapter_round_trips(tmp_path):
    model, tokenizer = load_model()
    data = _tiny_data()
    model = add_lora(model, r=8, lora_alpha=16)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.1 * sum(p.numel() for p in model.parameters())
    before = _loss(model, tokenizer, data)
    log = train_lora(model, tokenizer, data, epochs=3, learning_rate=2e-3, batch_size=4, progress=False)
    after = _loss(model, tokenizer, data)
    assert after < before - 0.2, (before, after)
    assert len(log) == 3 and log[-1]["loss"] < log[0]["loss"]
    # the reference (adapter disabled) is the untouched base model
    base_model, _ = load_model()
    with reference_model(model):
        assert _loss(model, tokenizer, data) == pytest.approx(_loss(base_model, tokenizer, data), abs=1e-4)
    # a saved adapter reloads merged, with the same behaviour
    path = save_adapter(model, tmp_path / "ft", base="smollm2-135m")
    reloaded, _ = load_model(path)
    assert not hasattr(reloaded, "peft_config")
    assert _loss(reloaded, tokenizer, data) == pytest.approx(after, abs=0.05)  # bf16 merge rounding


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


def test_onednn_linear_computes_the_float32_product_forward_and_backward():
    """`models.OneDNNLinear`: the same numbers as nn.Linear (to rounding), the input's gradient through a
    frozen weight, the default path for a trained weight, a fresh pack after the weight changes."""
    import copy

    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80)
    fast = copy.deepcopy(plain)
    fast.__class__ = models.OneDNNLinear
    x = torch.randn(3, 7, 48)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    for module in (plain, fast):
        module.weight.requires_grad_(False)
        module.bias.requires_grad_(False)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    for module, inp in zip((plain, fast), inputs):
        (module(inp) ** 2).sum().backward()
    torch.testing.assert_close(inputs[1].grad, inputs[0].grad, rtol=1e-4, atol=1e-4)
    fast.weight.requires_grad_(True)  # a weight being trained: nn.Linear's own forward, with its gradient
    fast(x).sum().backward()
    assert fast.weight.grad is not None
    with torch.no_grad():
        fast.weight.mul_(2.0)  # e.g. an adapter merged into it: the packed copy is rebuilt
        torch.testing.assert_close(fast(x), torch.nn.functional.linear(x, fast.weight, fast.bias), rtol=1e-5, atol=1e-5)
    clone = copy.deepcopy(fast)
    assert type(clone) is models.OneDNNLinear and not hasattr(clone, "_onednn_packed")
    with torch.no_grad():
        torch.testing.assert_close(clone(x), fast(x))


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


def test_4bit_qlora_step_runs_on_cpu():
    pytest.importorskip("bitsandbytes")
    model, tokenizer = load_model(quantization="4bit", device="cpu")
    assert getattr(model, "is_loaded_in_4bit", False)
    model = add_lora(model, r=4, lora_alpha=8)
    data = fictitious_authors(1, qa_per_author=2, seed=1)
    lora = [p for n, p in model.named_parameters() if "lora_B" in n][0]
    start = lora.detach().clone()
    log = train_lora(model, tokenizer, data, epochs=1, learning_rate=1e-3, batch_size=2, progress=False)
    assert torch.isfinite(torch.tensor(log[0]["loss"]))
    assert not torch.equal(start, lora.detach())


def test_qlora_gradients_do_not_depend_on_an_earlier_evaluation_pass():
    # On an AVX512-BF16 CPU bitsandbytes repacks 4-bit weights at the first forward pass without gradients,
    # for a kernel with no backward; load_model and add_lora keep the plain layout, so gradients through the
    # frozen 4-bit blocks to the lowest adapter are the same whether or not the model was evaluated first.
    pytest.importorskip("bitsandbytes")
    data = fictitious_authors(1, qa_per_author=2, seed=1)
    grads = []
    for evaluate_first in (False, True):
        model, tokenizer = load_model(quantization="4bit", device="cpu")
        batch = encode_qa(tokenizer, data["question"], data["answer"])
        if evaluate_first:
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.manual_seed(0)
        model = add_lora(model, r=4, lora_alpha=8)
        models.answer_loss(model, batch).backward()
        lowest = [p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n][0]
        grads.append(lowest.grad.detach().clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


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


def test_finetune_saves_and_reuses_only_with_the_same_settings(tmp_path, capsys):
    data = fictitious_authors(1, qa_per_author=2, seed=5)
    settings = dict(epochs=1, learning_rate=1e-3, batch_size=2, lora_r=4, lora_alpha=8, progress=False)
    _, _, log = finetune(data, tmp_path / "ft", **settings)
    assert len(log) == 1 and (tmp_path / "ft" / "adapter_config.json").exists()
    _, _, again = finetune(data, tmp_path / "ft", **settings)
    assert "reusing" in capsys.readouterr().out and again == log
    _, _, other = finetune(data, tmp_path / "ft", **{**settings, "epochs": 2})  # other settings: train anew
    assert len(other) == 2
    _, _, other_data = finetune(fictitious_authors(1, qa_per_author=2, seed=6), tmp_path / "ft", **{**settings, "epochs": 2})
    assert "reusing" not in capsys.readouterr().out and other_data[0]["loss"] != other[0]["loss"]


def test_merge_adapter_drops_the_stale_onednn_packs():
    """peft merges into weight.data in place; a oneDNN layer that ran before must not keep its old packed copy."""
    import torch

    from probunlearn.models import OneDNNLinear, add_lora, merge_adapter, use_onednn
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
