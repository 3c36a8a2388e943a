"""The answer positions' logits and the frozen trunk below a LoRA adapter give the numbers of the plain
forward pass."""

import copy

import pytest
import torch

from probunlearn.answers import answer_logits, answer_loss, pack_answer_logits
from probunlearn.models import add_lora, encode_qa, reference_model
from probunlearn.objectives import sequence_logprob
from probunlearn.unlearning import unlearn
from tiny_unlearning import FORGET, RETAIN, fresh, perturb_adapter


def test_answer_logits_run_the_head_on_answer_positions_only_and_match_the_full_forward(tiny):
    model, tokenizer = fresh(tiny)
    perturb_adapter(model)
    batch = encode_qa(tokenizer, [r["question"] for r in FORGET + RETAIN[:2]], [r["answer"] for r in FORGET + RETAIN[:2]])
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    fast, packed = answer_logits(model, batch), pack_answer_logits(full.logits, batch["labels"])
    mask = batch["labels"][:, 1:] != -100
    assert fast.logits.shape == (int(mask.sum()), 64) and fast.num_rows == 6
    assert torch.allclose(fast.logits, packed.logits, atol=1e-5)
    assert torch.equal(fast.targets, packed.targets) and torch.equal(fast.rows, packed.rows)
    assert answer_loss(model, batch).item() == pytest.approx(full.loss.item(), rel=1e-5)
    # the per-sequence sum regroups the tokens of each row
    expected = -torch.nn.functional.cross_entropy(full.logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                  reduction="none").sum(1)
    assert torch.allclose(sequence_logprob(fast), expected, atol=1e-4)


def test_frozen_trunk_runs_only_the_adapted_blocks_and_changes_no_number(tiny):
    """With the adapter on the top block only, the bottom block's output is kept per sequence; logits,
    reference logits and whole unlearning runs are those of plain forward passes."""
    from probunlearn.answers import FrozenTrunk

    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(tiny["model"]), r=4, lora_alpha=8, top_layers=1)
    tokenizer = tiny["tokenizer"]
    perturb_adapter(model)
    trunk = FrozenTrunk(model)
    assert trunk.enabled and trunk.first == 1
    assert not FrozenTrunk(fresh(tiny)[0]).enabled  # an adapter on every block: nothing to keep
    batch = encode_qa(tokenizer, [r["question"] for r in FORGET + RETAIN], [r["answer"] for r in FORGET + RETAIN])
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(trunk.logits(batch), plain, atol=1e-5)  # padding positions too
    assert len(trunk._states) == len(FORGET + RETAIN)
    wider = encode_qa(tokenizer, [r["question"] for r in FORGET], [r["answer"] for r in FORGET], pad_to=batch["input_ids"].shape[1] + 5)
    with torch.no_grad():  # a wider batch of rows already kept: their padding positions are computed anew
        assert torch.allclose(trunk.logits(wider), model(input_ids=wider["input_ids"],
                                                          attention_mask=wider["attention_mask"]).logits, atol=1e-5)
    with reference_model(model):
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(answer_logits(model, batch, trunk).logits, pack_answer_logits(reference, batch["labels"]).logits,
                              atol=1e-5)
    kept = unlearn(copy.deepcopy(model), tokenizer, FORGET, RETAIN, method="npo", steps=3, learning_rate=1e-2,
                   batch_size=2, progress=False)  # a trunk of its own, enabled
    copy_ = copy.deepcopy(model)
    plain_run = unlearn(copy_, tokenizer, FORGET, RETAIN, method="npo", steps=3, learning_rate=1e-2, batch_size=2,
                        trunk=_DisabledTrunk(copy_), progress=False)
    for a, b in zip(kept.log, plain_run.log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


class _DisabledTrunk:
    """A trunk that always runs the plain forward pass (the reference the kept states must match)."""

    def __init__(self, model):
        from probunlearn.answers import FrozenTrunk

        self._trunk = FrozenTrunk(model)
        self._trunk.enabled = False

    def __getattr__(self, name):
        return getattr(self._trunk, name)
