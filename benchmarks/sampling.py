"""Time probunlearn's sampler (SPEC §5) against the usual way of sampling n answers per question.

Workload: 8 questions x n = 64 answers x up to 48 new tokens on the embedded SmolLM2-135M-Instruct.
- ours: `probunlearn.sampling.sample_answers` (batched over questions, prompt computed once per
  question, cache allocated once, finished rows dropped, weights in the default dtype: bfloat16 on a
  CPU with AMX, else float32);
- reference: `model.generate(do_sample=True, num_return_sequences=n)` one question at a time, float32
  weights in plain `torch.nn.Linear` layers (`PROBUNLEARN_ONEDNN=0` for its load: what a user of
  transformers gets), the same temperature and top-p (top-k switched off).

It also measures the machine's matrix-product rate in the weights' dtype (a 512 x 576 x 1536
product, the shape of a decoding step's MLP, best of 20, plain or oneDNN-packed, whichever is
faster; before the first timed run and after each, the fastest of these taken, as a VM's rate
moves between moments) and prints the share of it that our run reaches, counting 2 x (parameters) FLOPs per
decoded token: the floor no sampler without shared prefixes can go below on this CPU.

With `--profile`, one more run of ours goes through `torch.profiler` and the script prints where its
time goes: matrix products with the weights, attention over the cache, the rest of the model's
forward pass (norms, rotary embeddings, activations, cache writes, Python inside it), drawing the
tokens (softmax, nucleus, race) and the decoding loop around them (cache rows copied for prefix
sharing, bookkeeping, Python). Decoding steps compute attention with `attention.decode_attention`
(matrix products, grouped query heads packed) by default; `--attention sdpa` times PyTorch's fused
kernel for them instead (as before 2026-12-04), `--attention eager` transformers' eager attention.

With `--adapter` the model carries a LoRA adapter beside its weights, as the unlearned models that
notebooks 04-06 sample do (the FLOPs of the floor stay those of the weights); `--lora-forward peft`
times peft's own LoRA forward instead of the sampler's lean one (`models.lean_lora`).

With `--backend vllm` (run it with the vLLM environment's python, `make vllm`: .venv-vllm/bin/python)
the same workload goes through `vllm_backend.VLLMSampler` instead of ours; its engine start is timed apart.

Run: python benchmarks/sampling.py [--questions 8] [--samples 64] [--max-new-tokens 48]
     [--temperature 1.0] [--top-p 1.0] [--batch-size N] [--repeats 1] [--threads N] [--dtype D]
     [--skip-reference] [--backend ours|vllm] [--profile] [--attention ours|sdpa|eager]
     [--adapter [--lora-forward lean|peft]]
Prints both wall times, the ratio (goal: ours >= 5x faster on a 2-core CPU) and, as a check that the
fast run samples the same distribution, the mean answer length of both.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections import Counter

import numpy as np
import torch

from probunlearn import attention, draws, sampling
from probunlearn.authors import fictitious_authors
from probunlearn.hardware import matrix_gflops
from probunlearn.models import encode_prompt, load_model
from probunlearn.sampling import sample_token_ids

SEED = 0  # data and sampling seed


def with_random_adapter(model, top_layers: int = 15):
    """`model` with an unlearning-sized LoRA adapter beside its weights (rank 8, alpha 16, the top 15 blocks,
    as the cpu profile's unlearned models) whose update is random and nonzero."""
    from probunlearn.models import add_lora

    torch.manual_seed(SEED)  # lora_A's initialisation: the same adapter in every run
    model = add_lora(model, r=8, lora_alpha=16, top_layers=top_layers).eval()
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.01)
    return model


def workload(num_questions: int) -> list[str]:
    """Questions about fictitious authors (the forget-set kind) and a few general ones."""
    authors = list(fictitious_authors(2, 20, seed=SEED)["question"])[::7]  # different facts
    general = ["What is the capital of France?", "Who wrote Pride and Prejudice?", "How many legs does a spider have?"]
    questions = general[: num_questions // 4] + authors
    return questions[:num_questions]


def run_ours(model, tokenizer, questions, args) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = sample_token_ids(model, tokenizer, questions, num_samples=args.samples, temperature=args.temperature,
                           top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=SEED,
                           batch_size=args.batch_size, progress=False, loop=args.loop)
    seconds = time.perf_counter() - start
    return seconds, [len(r) for rows in ids for r in rows]


MATRIX_OPS = {"mkldnn::_linear_pointwise", "aten::addmm", "aten::mm"}
ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "aten::bmm")
FORWARD, DRAW, ATTENTION = "model forward", "drawing the tokens", "attention"
PARTS = ("matrix products (weights)", "attention over the cache", "rest of the forward pass",
         "drawing the tokens (softmax, nucleus, race)", "decoding loop (cache row copies, bookkeeping, Python)")


def profile_ours(model, tokenizer, questions, args) -> tuple[float, dict[str, float]]:
    """One run of ours under torch.profiler: its wall time and the share of it in each of PARTS.
    Each operator's own time goes to the part of the labelled call it runs in (the model's forward
    pass, `draws.draw`); time outside every operator is Python, counted where it runs."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def labelled(label, function):
        def call(*a, **k):
            with record_function(label):
                return function(*a, **k)
        return call

    draw, decode = draws.draw, attention.decode_attention  # `decoding_attention` registers the latter per batch
    draws.draw, model.forward = labelled(DRAW, draw), labelled(FORWARD, model.forward)
    attention.decode_attention = labelled(ATTENTION, decode)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            seconds, _ = run_ours(model, tokenizer, questions, args)
    finally:
        draws.draw, attention.decode_attention = draw, decode
        del model.forward  # the class's method again
    spent = Counter()
    for event in prof.events():
        node, label = event, None
        while label is None and node is not None:  # the innermost labelled call the operator runs in
            label = node.name if node.name in (FORWARD, DRAW, ATTENTION) else None
            node = node.cpu_parent
        if label == DRAW:
            part = PARTS[3]
        elif label == ATTENTION:  # everything inside our attention function, copies included
            part = PARTS[1]
        elif label == FORWARD and event.name in MATRIX_OPS:
            part = PARTS[0]
        elif label == FORWARD and any(name in event.name for name in ATTENTION_OPS):
            part = PARTS[1]
        else:
            part = PARTS[2] if label == FORWARD else PARTS[4]
        spent[part] += event.self_cpu_time_total / 1e6
    spent[PARTS[4]] += max(seconds - sum(spent.values()), 0.0)  # Python outside every operator and label
    total = sum(spent.values())
    return seconds, {part: spent[part] / total for part in PARTS}


@torch.inference_mode()
def run_reference(model, tokenizer, questions, args) -> tuple[float, list[int]]:
    torch.manual_seed(SEED)
    eos = tokenizer.eos_token_id
    lengths = []
    start = time.perf_counter()
    for question in questions:
        ids = torch.tensor([encode_prompt(tokenizer, question)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             num_return_sequences=args.samples, temperature=args.temperature, top_p=args.top_p,
                             top_k=0, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[:, ids.shape[1]:]
        for row in new.tolist():  # tokens up to EOS, EOS excluded, as ours counts them
            lengths.append(row.index(eos) if eos in row else len(row))
    return time.perf_counter() - start, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=None, help="rows decoded together (default: the sampler's)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of ours; the best is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both runs (default: torch's)")
    parser.add_argument("--dtype", choices=["default", "float32", "bfloat16"], default="default",
                        help="weights of our run (default: hardware.default_dtype: bfloat16 with AMX, else float32)")
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--backend", choices=["ours", "vllm"], default="ours", help="the sampler timed as 'ours'")
    parser.add_argument("--profile", action="store_true", help="one more run of ours, profiled: where its time goes")
    parser.add_argument("--attention", choices=["ours", "sdpa", "eager"], default="ours",
                        help="attention of ours in decoding steps (default: attention.decode_attention)")
    parser.add_argument("--adapter", action="store_true",
                        help="sample a model with a LoRA adapter beside its weights, as notebooks 04-06 sample the "
                             "unlearned models (rank 8 on the top 15 blocks, a random nonzero update)")
    parser.add_argument("--lora-forward", choices=["lean", "peft"], default="lean",
                        help="with --adapter: the sampler's lean LoRA forward (models.lean_lora) or peft's own")
    parser.add_argument("--loop", choices=["auto", "prefix", "static"], default="auto",
                        help="decoding loop of ours (sampling.LOOPS; auto: prefix on a CPU, static on a GPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    questions = workload(args.questions)
    print(f"{len(questions)} questions x n={args.samples} x <= {args.max_new_tokens} new tokens, "
          f"T={args.temperature}, top-p={args.top_p}, {torch.get_num_threads()} threads")
    model, tokenizer = load_model("smollm2-135m", dtype=None if args.dtype == "default" else getattr(torch, args.dtype))
    if args.attention == "eager":
        model.set_attn_implementation("eager")
    if args.attention != "ours":  # the model's own attention in decoding steps too
        sampling.decoding_attention = contextlib.nullcontext
    if args.adapter:
        model = with_random_adapter(model)
        if args.lora_forward == "peft":
            sampling.lean_lora = contextlib.nullcontext
    dtype, params = model.dtype, sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    name = str(dtype).removeprefix("torch.")
    if args.backend == "vllm":
        from probunlearn.models import embedded_model_dir
        from probunlearn.vllm_backend import VLLMSampler

        start = time.perf_counter()
        model = VLLMSampler(str(embedded_model_dir()), tokenizer, dtype=name, seed=SEED)
        print(f"  vLLM engine start: {time.perf_counter() - start:.1f} s (not counted below)", flush=True)
    run_ours(model, tokenizer, questions[:1], argparse.Namespace(**{**vars(args), "samples": 2, "max_new_tokens": 2}))
    rates = [matrix_gflops(dtype)]  # the machine's rate, measured around every run: a VM's moves by +-10 %
    runs = []
    for _ in range(args.repeats):
        runs.append(run_ours(model, tokenizer, questions, args))
        rates.append(matrix_gflops(dtype))
    best, lengths = min(runs)
    tokens = sum(lengths) + sum(n < args.max_new_tokens for n in lengths)  # + the EOS tokens
    rate = max(rates)  # the floor at the fastest rate measured: a slow moment never lowers it
    achieved = tokens * 2 * params / best / 1e9
    label = "ours" if args.backend == "ours" else "vLLM"
    print(f"  {label:9} ({name}): {best:7.1f} s  "
          f"{tokens / best:6.0f} tokens/s  mean answer {np.mean(lengths):.1f} tokens")
    print(f"  matrix products in {name}: {rate:.0f} GFLOP/s on this machine (the best of {len(rates)} measurements "
          f"around the runs, the lowest {min(rates):.0f}); {label} reaches "
          f"{achieved:.0f} GFLOP/s ({achieved / rate:.0%}) at 2 x {params / 1e6:.0f} M FLOPs per token, so the "
          f"floor for this workload is {tokens * 2 * params / rate / 1e9:.1f} s")
    if args.profile and args.backend == "ours":
        seconds, shares = profile_ours(model, tokenizer, questions, args)
        print(f"  where the time goes (one more run of ours, profiled: {seconds:.1f} s, decoding attention "
              f"{args.attention}):")
        for part, share in shares.items():
            print(f"    {part:55} {share:6.1%}")
    if args.skip_reference:
        return
    del model
    os.environ["PROBUNLEARN_ONEDNN"] = "0"  # plain nn.Linear, as transformers loads it
    reference, tokenizer = load_model("smollm2-135m", dtype=torch.float32)
    seconds, ref_lengths = run_reference(reference, tokenizer, questions, args)
    print(f"  reference (float32, generate): {seconds:7.1f} s  mean answer {np.mean(ref_lengths):.1f} tokens", flush=True)
    print(f"  ratio: {label} is {seconds / best:.1f}x faster (goal for ours: >= 5x)", flush=True)


if __name__ == "__main__":
    main()
