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
    _, _, log = finetune(data, tmp_path / "ft", **settings)
    assert len(log) == 1 and (tmp_path / "ft" / "adapter_config.json").exists()
    _, _, again = finetune(data, tmp_path / "ft", **settings)
    assert "reusing" in capsys.readouterr().out and again == log
    _, _, other = finetune(data, tmp_path / "ft", **{**settings, "epochs": 2})  # other settings: train anew
    assert len(other) == 2
    _, _, other_data = finetune(fictitious_authors(1, qa_per_author=2, seed=6), tmp_path / "ft", **{**settings, "epochs": 2})
    assert "reusing" not in capsys.readouterr().out and other_data[0]["loss"] != other[0]["loss"]
