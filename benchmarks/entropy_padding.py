"""What [P1]'s averaging of the entropy term costs on this machine: one unlearning step of GA and of
GA + entropy optimisation (all positions, λ_f = 1, λ_r = −0.25) with the batches padded to their
longest row (the cpu profile) and to 256 tokens ([P1]'s code), for full fine-tuning (float32
weights, bfloat16 products where the CPU is fast at them: notebook 04) and for the LoRA setting of
notebook 03 (r = 8 on the top 15 blocks, frozen trunk).

Workload: notebook 04's batches (4 forget and 4 retain QA of the generated authors) on the embedded
SmolLM2-135M-Instruct. Each setting runs `--warmup` steps (the frozen trunk fills its states for new
rows then), then `--steps` timed ones; prints the median seconds per step and the ratio padded /
unpadded, with the machine.

Run: python benchmarks/entropy_padding.py [--steps 4] [--warmup 2]
"""

from __future__ import annotations

import argparse
import statistics

from probunlearn.answers import FrozenTrunk
from probunlearn.authors import fictitious_authors
from probunlearn.hardware import describe_machine
from probunlearn.models import add_lora, load_model
from probunlearn.objectives import entropy_regulariser
from probunlearn.unlearning import full_tuning_dtype, start_full_unlearning, unlearn


def seconds_per_step(model, tokenizer, forget, retain, *, pad_to, entropy, steps, warmup, trunk=None, compute_dtype=None):
    regularisers = [entropy_regulariser(1.0, -0.25, "all")] if entropy else []
    run = unlearn(model, tokenizer, forget, retain, method="ga", steps=warmup + steps, learning_rate=1e-5, batch_size=4,
                  regularisers=regularisers, pad_to=pad_to, trunk=trunk, compute_dtype=compute_dtype, progress=False)
    times = [run.log[0]["seconds"]] + [b["seconds"] - a["seconds"] for a, b in zip(run.log, run.log[1:])]
    return statistics.median(times[warmup:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    records = fictitious_authors(num_authors=8, qa_per_author=16, seed=0)
    forget, retain = records.select(range(32)), records.select(range(32, len(records)))
    print(describe_machine())
    for tuning in ("full", "lora"):
        if tuning == "full":
            model, tokenizer = start_full_unlearning("smollm2-135m")
            trunk, compute = None, full_tuning_dtype(model)
        else:
            model, tokenizer = load_model()
            model = add_lora(model, r=8, lora_alpha=16, top_layers=15)
            trunk, compute = FrozenTrunk(model), None
        for entropy in (False, True):
            times = {pad: seconds_per_step(model, tokenizer, forget, retain, pad_to=pad, entropy=entropy, steps=args.steps,
                                           warmup=args.warmup, trunk=trunk, compute_dtype=compute) for pad in (None, 256)}
            label = f"{tuning:>4} {'GA + EO (all positions)' if entropy else 'GA':<24}"
            print(f"{label} longest row {times[None]:6.2f} s/step   256 tokens {times[256]:6.2f} s/step   "
                  f"x{times[256] / times[None]:.1f}", flush=True)
        del model


if __name__ == "__main__":
    main()
