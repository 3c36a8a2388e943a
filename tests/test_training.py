"""Fine-tuning (probunlearn.training): LoRA steps lower the answer loss, and a trained adapter is reused only
with the same settings."""

import pytest
import torch

from probunlearn.authors import fictitious_authors
from probunlearn.models import add_lora, encode_qa, load_model, reference_model, save_adapter
from probunlearn.training import finetune, train_lora


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


def test_finetune_saves_and_reuses_only_with_the_same_settings(tmp_path, capsys):
    data = fictitious_authors(1, qa_per_author=2, seed=5)
    settings = dict(epochs=1, learning_rate=1e-3, batch_size=2, lora_r=4, lora_alpha=8, progress=False)
    trained, tokenizer, log = finetune(data, tmp_path / "ft", **settings)
    assert len(log) == 1 and (tmp_path / "ft" / "adapter_config.json").exists()
    reused, _, again = finetune(data, tmp_path / "ft", **settings)
    assert "reusing" in capsys.readouterr().out and again == log
    # trained now or reused, the same model: the one later notebooks load (the adapter merged into its base)
    batch = tokenizer(list(data["question"]), return_tensors="pt", padding=True)
    with torch.no_grad():
        assert type(trained) is type(reused) and not hasattr(trained, "peft_config")
        assert torch.equal(trained(**batch).logits, reused(**batch).logits)
    _, _, other = finetune(data, tmp_path / "ft", **{**settings, "epochs": 2})  # other settings: train anew
    assert len(other) == 2
    _, _, other_data = finetune(fictitious_authors(1, qa_per_author=2, seed=6), tmp_path / "ft", **{**settings, "epochs": 2})
    assert "reusing" not in capsys.readouterr().out and other_data[0]["loss"] != other[0]["loss"]


def test_micro_batches_take_the_step_of_the_whole_batch(tiny):
    """`micro_batch_size` (relearning on a GPU): the parts' gradients, weighted by their answer
    tokens, add up to the whole batch's, so the adapter after a few steps is the same."""
    from datasets import Dataset

    from probunlearn.unlearning import adapter_state
    from tiny_unlearning import FORGET, RETAIN, fresh

    data = Dataset.from_list(FORGET + RETAIN)  # answers of different lengths
    states = []
    for micro in (None, 3):
        model, tokenizer = fresh(tiny)
        log = train_lora(model, tokenizer, data, epochs=3, learning_rate=1e-2, batch_size=len(data),
                         micro_batch_size=micro, progress=False)
        states.append((adapter_state(model), [row["loss"] for row in log]))
    (whole, whole_loss), (parts, parts_loss) = states
    assert parts_loss == pytest.approx(whole_loss, rel=1e-5)
    assert all(torch.allclose(whole[k], parts[k], atol=1e-6) for k in whole)
    assert any((whole[k] != 0).any() for k in whole if "lora_B" in k)  # it did train
