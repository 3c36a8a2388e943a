"""Time one LoRA training step with PyTorch's fused CPU attention (sdpa) against plain matrix-product
attention (eager), which `models.training_attention` switches to for training steps on a CPU.

Workload: notebook 02's fine-tuning step on the embedded SmolLM2-135M-Instruct in its default dtype
(bfloat16 on a CPU with AMX/AVX512-BF16): batch 16 of generated author QA, LoRA r = 32 on every
linear layer, forward + backward. The two settings alternate, so drifts of the machine hit both.

Run: python benchmarks/training.py [--steps 6] [--batch-size 16] [--lora-r 32]
Prints the per-step wall times and their medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

from probunlearn.data import fictitious_authors
from probunlearn.models import AnswerOnlyCollator, add_lora, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lora-r", type=int, default=32)
    args = parser.parse_args()
    data = fictitious_authors(4, 16, seed=0)
    model, tokenizer = load_model()
    model = add_lora(model, r=args.lora_r, lora_alpha=2 * args.lora_r)
    collate = AnswerOnlyCollator(tokenizer, None)
    batches = [collate([data[i] for i in range(k, k + args.batch_size)])
               for k in range(0, len(data) - args.batch_size + 1, args.batch_size)]
    model.train()
    times = {"sdpa": [], "eager": []}
    for step in range(args.steps):
        for attention in times:
            model.set_attn_implementation(attention)
            start = time.perf_counter()
            model(**batches[step % len(batches)]).loss.backward()
            times[attention].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    print(f"{model.dtype}, batch {args.batch_size}, LoRA r {args.lora_r}, {args.steps} steps each")
    for attention, values in times.items():
        print(f"{attention:>5}: median {statistics.median(values):.2f} s/step  ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"eager / sdpa: {statistics.median(times['eager']) / statistics.median(times['sdpa']):.2f}")


if __name__ == "__main__":
    main()
