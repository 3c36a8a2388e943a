"""Time one LoRA training step of notebook 02 under each idea that cuts its work, alternating the
settings so that drifts of the machine hit all of them.

Workload: the fine-tuning step of notebook 02 on the embedded SmolLM2-135M-Instruct in the default
dtype (bfloat16 with AMX, else float32): batch 16 of generated author
QA, LoRA r = 32, forward + backward, eager attention (`models.training_attention`). The settings:

- `before`: SmolLM2's default system prompt, LoRA on every block, the output head on every position
  (what notebook 02 ran before);
- `+ empty system turn`: `models.SYSTEM_PROMPT = ""` (16 fewer tokens per sequence);
- `+ answer-only head`: `answers.answer_loss` (the 49k-way head on answer positions only);
- `+ top 15 blocks`: LoRA on the last 15 of 30 blocks (backpropagation stops below them);
- `+ frozen trunk`: `answers.FrozenTrunk` (the 15 frozen blocks run once per sequence, not per step;
  filled before the timed steps, as after the first epoch of fine-tuning).

Run: python benchmarks/training.py [--steps 5] [--batch-size 16]
Prints the median seconds per step of each setting, the machine's float32 GEMM rate and the share
of it each setting reaches (model FLOPs: 2 x parameters per token for each block and head run
forward, the same again for each block and head the backward pass goes through).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from probunlearn import models
from probunlearn.answers import FrozenTrunk, answer_loss
from probunlearn.authors import fictitious_authors
from probunlearn.hardware import describe_machine
from probunlearn.models import add_lora, encode_qa, load_model, training_attention

SETTINGS = ["before", "+ empty system turn", "+ answer-only head", "+ top 15 blocks", "+ frozen trunk"]


def gemm_gflops(rows: int = 768, repeats: int = 20) -> float:
    """The machine's rate (GFLOP/s) for the model's typical product, rows x 576 @ 576 x 1536."""
    a, b = torch.randn(rows, 576), torch.randn(576, 1536)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * 576 * 1536 * repeats / (time.perf_counter() - start) / 1e9


def step_flops(model, batch, *, head_positions: int, backward_blocks: int, forward_blocks: int) -> float:
    """Model FLOPs of one step (see the module docstring)."""
    config = model.config
    block = sum(p.numel() for n, p in model.named_parameters() if ".layers.0." in n and "lora" not in n)
    head = config.vocab_size * config.hidden_size
    tokens = int(batch["attention_mask"].sum())
    forward = 2 * (forward_blocks * block * tokens + head * head_positions)
    backward = 2 * (backward_blocks * block * tokens + head * head_positions)
    return forward + backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    print(describe_machine())
    data = fictitious_authors(8, 16, seed=0)
    records = [data[i] for i in range(len(data))]
    base, tokenizer = load_model()
    print(f"weights in {base.dtype}; float32 GEMM rate {gemm_gflops():.0f} GFLOP/s")
    adapters = {"all": add_lora(load_model()[0], r=32, lora_alpha=64),
                "top": add_lora(load_model()[0], r=32, lora_alpha=64, top_layers=15)}
    trunk = FrozenTrunk(adapters["top"])

    def batches(system_prompt):
        saved = models.SYSTEM_PROMPT
        models.SYSTEM_PROMPT = system_prompt
        try:
            return [encode_qa(tokenizer, [r["question"] for r in records[k:k + args.batch_size]],
                              [r["answer"] for r in records[k:k + args.batch_size]])
                    for k in range(0, len(records) - args.batch_size + 1, args.batch_size)]
        finally:
            models.SYSTEM_PROMPT = saved

    with_default, empty = batches(None), batches("")
    plan = {  # setting: (model, batches, loss, trunk, blocks run forward, blocks run backward, head on answers only)
        "before": (adapters["all"], with_default, "full", None, 30, 30, False),
        "+ empty system turn": (adapters["all"], empty, "full", None, 30, 30, False),
        "+ answer-only head": (adapters["all"], empty, "answer", None, 30, 30, True),
        "+ top 15 blocks": (adapters["top"], empty, "answer", None, 30, 15, True),
        "+ frozen trunk": (adapters["top"], empty, "answer", trunk, 15, 15, True),
    }
    for model, _, _, _, _, _, _ in plan.values():
        model.train()
    with torch.no_grad():  # the trunk keeps each sequence once; fine-tuning meets every batch again each epoch
        for batch in empty:
            trunk.hidden(batch["input_ids"], batch["attention_mask"])
    times = {name: [] for name in SETTINGS}
    flops = {}
    for step in range(args.steps + 1):  # step 0 warms up (and fills the trunk); it is not counted
        for name in SETTINGS:
            model, data_batches, loss_kind, kept, forward_blocks, backward_blocks, answer_only = plan[name]
            batch = data_batches[step % len(data_batches)]
            with training_attention(model):
                start = time.perf_counter()
                loss = model(**batch).loss if loss_kind == "full" else answer_loss(model, batch, kept)
                loss.backward()
                seconds = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if step:
                times[name].append(seconds)
            head = int((batch["labels"][:, 1:] != -100).sum()) if answer_only else int(batch["attention_mask"].sum())
            flops.setdefault(name, []).append(step_flops(model, batch, head_positions=head,
                                                         forward_blocks=forward_blocks, backward_blocks=backward_blocks))
    rate = gemm_gflops()
    print(f"batch {args.batch_size}, LoRA r 32, {args.steps} steps each (median s/step; share of the GEMM rate "
          f"{rate:.0f} GFLOP/s measured after the steps)")
    first = statistics.median(times["before"])
    for name in SETTINGS:
        median = statistics.median(times[name])
        reached = statistics.median(flops[name]) / median / 1e9
        print(f"  {name:<22} {median:6.2f} s/step  {median / first:5.2f}x of before  "
              f"{reached:5.0f} GFLOP/s ({reached / rate:.0%} of GEMM)")


if __name__ == "__main__":
    main()
