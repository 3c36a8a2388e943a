"""Quantised models (probunlearn.quantization): a 4-bit QLoRA step on a CPU, and gradients through the plain
4-bit layout."""

import pytest
import torch

from probunlearn import answers
from probunlearn.authors import fictitious_authors
from probunlearn.models import add_lora, encode_qa, load_model
from probunlearn.training import train_lora


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_4bit_qlora_step_runs_on_cpu(checkpointing):
    """A QLoRA step on the 4-bit model, also with gradient checkpointing (on by default on a GPU)."""
    pytest.importorskip("bitsandbytes")
    model, tokenizer = load_model(quantization="4bit", device="cpu")
    assert getattr(model, "is_loaded_in_4bit", False)
    model = add_lora(model, r=4, lora_alpha=8, gradient_checkpointing=checkpointing)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is checkpointing
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
        answers.answer_loss(model, batch).backward()
        lowest = [p for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n][0]
        grads.append(lowest.grad.detach().clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])
