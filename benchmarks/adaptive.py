"""Time `temperature.evaluate_adaptive` with replay (decode again only the answers adaptive
temperature could change) against a full second pass (SPEC §2; notebook 04).

Workload: notebook 04's cpu sampling of one model: 8 forget and 8 retain questions evenly spread,
n = 48 answers of up to 32 new tokens, h_τ the 5 % quantile of the retain steps, greedy low branch.
The model is an unlearned model of a finished cpu run when there is one (`--model`, default
results/cpu/models/ga_mix), else the embedded base model on generated questions.

Run: python benchmarks/adaptive.py [--model PATH] [--questions 8] [--samples 48] [--max-new-tokens 32]
     [--repeats 2]
Prints the median wall time of both (the plain pass included in each), the share of answers replay decoded again, and whether both give the
same answers (in bfloat16 a few may differ where the batch shape changes the rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from probunlearn.authors import fictitious_authors
from probunlearn.data import load_split
from probunlearn.models import load_model
from probunlearn.probabilistic import spread_subset
from probunlearn.temperature import evaluate_adaptive


def splits(model_path: Path, questions: int) -> dict:
    data = model_path.parent.parent / "data"
    if (data / "forget.jsonl").exists():
        return {name: spread_subset(load_split(data, name), questions) for name in ("forget", "retain")}
    authors = fictitious_authors(4, 16, seed=0)
    half = len(authors) // 2
    return {"forget": spread_subset(authors.select(range(half)), questions),
            "retain": spread_subset(authors.select(range(half, len(authors))), questions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="results/cpu/models/ga_mix")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    path = Path(args.model)
    model, tokenizer = load_model(path if path.exists() else "smollm2-135m")
    sets = splits(path, args.questions)
    source = "the run's forget/retain splits" if (path.parent.parent / "data" / "forget.jsonl").exists() else "generated authors"
    print(f"model: {path if path.exists() else 'smollm2-135m (no cpu run found)'}; questions: {source}; "
          f"{len(sets['forget'])} forget + {len(sets['retain'])} retain questions x n = {args.samples}")
    kwargs = dict(num_samples=args.samples, max_new_tokens=args.max_new_tokens, progress=False)
    evaluate_adaptive(model, tokenizer, {split: ds.select([0]) for split, ds in sets.items()}, num_samples=2,
                      max_new_tokens=4, progress=False)  # warm-up: the first call pays one-off costs
    out, seconds = {}, {True: [], False: []}
    for _ in range(args.repeats):  # alternate, so drifts of the machine hit both
        for replay in (True, False):
            start = time.perf_counter()
            out[replay] = evaluate_adaptive(model, tokenizer, sets, replay=replay, **kwargs)
            seconds[replay].append(time.perf_counter() - start)
    seconds = {replay: statistics.median(values) for replay, values in seconds.items()}
    same = sum(a == b for split in sets for ra, rb in zip(out[True]["adaptive"][split][1]["samples"],
                                                         out[False]["adaptive"][split][1]["samples"])
               for a, b in zip(ra, rb))
    total = sum(len(sets[split]) * args.samples for split in sets)
    print(f"h_tau {out[True]['threshold']:.3g} nats; fire rate forget {out[True]['fire_rate']['forget']:.3f} "
          f"retain {out[True]['fire_rate']['retain']:.3f}")
    print(f"replay:    {seconds[True]:6.1f} s (redrew {out[True]['redrawn']['forget']:.1%} of forget and "
          f"{out[True]['redrawn']['retain']:.1%} of retain answers)")
    print(f"full pass: {seconds[False]:6.1f} s")
    print(f"speed-up {seconds[False] / seconds[True]:.2f}x; identical adaptive answers: {same}/{total}")


if __name__ == "__main__":
    main()
