"""The records and helpers that the tests of unlearning, its objectives, control and evaluation share
(their model is the `tiny` fixture of conftest.py)."""

import copy

import torch

from probunlearn.likelihood import answer_nll
from probunlearn.models import add_lora, encode_qa


TITLES = ["Salt", "Iron", "Glass", "Amber"]


def _record(author, title):
    return {"question": f"What did {author} write?", "answer": f"{author} wrote {title}.",
            "paraphrased_answer": f"{title} was written by {author}.",
            "perturbed_answer": [f"{author} painted {title}.", f"{author} sang {title}.", f"{author} sold {title}."],
            "author": author, "keywords": [title]}


FORGET = [_record("Ana", t) for t in TITLES]
RETAIN = [_record(a, t) for a in ("Bo", "Cy") for t in TITLES]


def fresh(tiny, seed=0):
    """A copy of the tiny target with a fresh LoRA adapter (what `start_unlearning` gives)."""
    torch.manual_seed(seed)
    return add_lora(copy.deepcopy(tiny["model"]), r=4, lora_alpha=8), tiny["tokenizer"]


def logits_of(model, tokenizer, records=FORGET):
    batch = encode_qa(tokenizer, [r["question"] for r in records], [r["answer"] for r in records])
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def perturb_adapter(model, std=0.3, seed=1):
    """Stand-in for an unlearning run: random lora_B (a fresh adapter has lora_B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def forget_nll(model, tokenizer):
    return answer_nll(model, tokenizer, [r["question"] for r in FORGET], [r["answer"] for r in FORGET]).mean()
