"""One-shot check of the GPU code paths on a bare CUDA machine (issue: the first GPU).

Weights cannot travel to such a machine, so the check builds a model of SmolLM2-135M's shape with
random weights from its config and tokenizer files (a few MB; `--export-files DIR` writes them
here from the embedded model), and runs, printing one line per check:

1. `finetune`: LoRA fine-tuning steps on a few QA pairs (the loss must fall);
2. `qlora_ga`, `qlora_npo`: the model reloaded in 4-bit NF4 (bitsandbytes), a fresh LoRA adapter
   (QLoRA), unlearning steps with GA and with NPO, whose reference model is the same weights
   with the adapter disabled (the forget NLL must rise);
3. `sampler_exact`: our sampler's first tokens against the model's exact next-token probabilities
   (chi-square over the likely tokens, p above 1e-4);
4. `sampler_batch`: the same answers whatever the batch size;
5. `speed`: tokens per second of our sampler and of `model.generate` on the same workload, and the
   peak GPU memory.

Needs torch (CUDA), transformers, peft, accelerate, numpy, scipy, pandas, tqdm and, for the 4-bit
checks, bitsandbytes (a wheel; `pip install bitsandbytes-*.whl`). It imports probunlearn from
`lib/` of this checkout; datasets, rouge-score and papermill are not needed.

    python benchmarks/gpu_check.py --files smollm2-files            # on the GPU machine: < 5 min
    python benchmarks/gpu_check.py --device cpu --small             # the dry run the tests do here
    python benchmarks/gpu_check.py --export-files smollm2-files     # here: config + tokenizer only
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # a bare machine: the package is not installed

import numpy as np  # noqa: E402
import torch  # noqa: E402

FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
QA = [(f"What is the favourite colour of author {name}?", f"The favourite colour of {name} is {colour}.")
      for name, colour in [("Ilsa Varn", "teal"), ("Odo Brask", "amber"), ("Mira Tull", "crimson"),
                           ("Pell Oster", "olive"), ("Runa Kelt", "indigo"), ("Teo Marsh", "coral")]]


def line(name: str, ok: bool, detail: str, started: float) -> bool:
    print(f"check {name:<14} {'ok  ' if ok else 'FAIL'} {detail} ({time.perf_counter() - started:.1f} s)", flush=True)
    return ok


def export_files(folder: Path) -> None:
    from probunlearn.models import embedded_model_dir

    source = embedded_model_dir()
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    print(f"wrote {', '.join(sorted(p.name for p in folder.iterdir()))} to {folder}")


def build(files: Path, device: str, small: bool):
    """A random-weight model of the files' config (shrunk with `small`) and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(files)
    if small:  # the dry run: the same architecture, a few small blocks
        config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    with torch.no_grad():  # random weights give near-uniform next tokens; sharpen them so the exactness test has power
        model.get_output_embeddings().weight.mul_(10)
    tokenizer = AutoTokenizer.from_pretrained(files)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def records(pairs):
    return [{"question": q, "answer": a, "author": q.split("author ")[1].rstrip("?"), "keywords": [a.split()[-1][:-1]]}
            for q, a in pairs]


def check_finetune(model, tokenizer, steps: int) -> bool:
    from probunlearn.models import add_lora
    from probunlearn.training import train_lora

    started = time.perf_counter()
    peft_model = add_lora(model, r=8, lora_alpha=16)
    log = train_lora(peft_model, tokenizer, records(QA), epochs=steps, learning_rate=5e-3, batch_size=len(QA),
                     progress=False)
    first, last = log[0]["loss"], log[-1]["loss"]
    peft_model.unload()  # the plain model back, for the other checks
    return line("finetune", last < first, f"{steps} LoRA steps, loss {first:.3f} -> {last:.3f}", started)


def check_qlora(model, tokenizer, method: str, steps: int) -> bool:
    from probunlearn.likelihood import answer_nll
    from probunlearn.models import add_lora
    from probunlearn.quantization import quantized_copy
    from probunlearn.unlearning import unlearn

    started = time.perf_counter()
    quantized = quantized_copy(model, "4bit", dtype=torch.float32 if model.dtype == torch.float32 else torch.bfloat16)
    peft_model = add_lora(quantized, r=8, lora_alpha=16)
    forget, retain = records(QA[:3]), records(QA[3:])
    questions, answers = [r["question"] for r in forget], [r["answer"] for r in forget]
    before = float(np.mean(answer_nll(peft_model, tokenizer, questions, answers)))
    unlearn(peft_model, tokenizer, forget, retain, method=method, steps=steps, learning_rate=5e-3, batch_size=3,
            progress=False)
    after = float(np.mean(answer_nll(peft_model, tokenizer, questions, answers)))
    layer = type(peft_model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__
    return line(f"qlora_{method}", after > before,
                f"4-bit base ({layer}), {steps} steps, forget NLL {before:.3f} -> {after:.3f}", started)


def check_sampler(model, tokenizer, samples: int) -> tuple[bool, bool]:
    from probunlearn.models import encode_prompt
    from probunlearn.sampling import sample_token_ids
    from probunlearn.stats import chi_square_p

    started = time.perf_counter()
    question = QA[0][0]
    ids = torch.tensor([encode_prompt(tokenizer, question)], device=model.device)
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1).double().cpu().numpy()
    drawn = sample_token_ids(model, tokenizer, [question], num_samples=samples, max_new_tokens=1, seed=0, progress=False)[0]
    first = np.array([answer[0] if answer else tokenizer.eos_token_id for answer in drawn])
    p_value = chi_square_p(np.bincount(first, minlength=probs.size), probs)
    likely = int((probs * samples >= 5).sum())  # chi-square cells: tokens expected >= 5 times, the rest pooled
    exact = line("sampler_exact", p_value > 1e-4, f"{samples} first tokens, {likely} cells, chi-square p = {p_value:.3g}",
                 started)
    started = time.perf_counter()
    a = sample_token_ids(model, tokenizer, [q for q, _ in QA[:3]], num_samples=8, max_new_tokens=12, seed=3, batch_size=5, progress=False)
    b = sample_token_ids(model, tokenizer, [q for q, _ in QA[:3]], num_samples=8, max_new_tokens=12, seed=3, batch_size=24, progress=False)
    same = a == b
    batch = line("sampler_batch", same, "3 questions x 8 answers x 12 tokens: batch 5 and 24 give "
                 + ("the same answers" if same else "different answers"), started)
    return exact, batch


def check_speed(model, tokenizer, questions: int, samples: int, tokens: int) -> bool:
    from probunlearn.models import format_prompt
    from probunlearn.sampling import sample_token_ids

    started = time.perf_counter()
    prompts = [f"{q} ({i})" for i in range(questions) for q, _ in QA[:1]]
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    tick = time.perf_counter()
    ours = sample_token_ids(model, tokenizer, prompts, num_samples=samples, max_new_tokens=tokens, seed=0, progress=False)
    ours_seconds = time.perf_counter() - tick
    ours_tokens = sum(len(a) for per_question in ours for a in per_question)
    tick, generated = time.perf_counter(), 0
    for prompt in prompts:
        batch = tokenizer(format_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, num_return_sequences=samples, max_new_tokens=tokens,
                                 top_k=0, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        generated += int((new != tokenizer.pad_token_id).sum())
    generate_seconds = time.perf_counter() - tick
    memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if model.device.type == "cuda" else ""
    return line("speed", True, f"ours {ours_tokens / ours_seconds:.0f} tokens/s, model.generate "
                f"{generated / generate_seconds:.0f} tokens/s ({questions} x {samples} x {tokens}){memory}", started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=Path, help="folder with config.json and the tokenizer files (default: the embedded model's)")
    parser.add_argument("--export-files", type=Path, metavar="DIR", help="write the config and tokenizer files to DIR and stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a 2-block model and small workloads (the CPU dry run)")
    parser.add_argument("--no-4bit", action="store_true", help="skip the QLoRA checks (no bitsandbytes)")
    args = parser.parse_args(argv)
    if args.export_files:
        export_files(args.export_files)
        return 0
    files = args.files
    if files is None:
        from probunlearn.models import embedded_model_dir

        files = embedded_model_dir()
    import transformers

    started = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    model, tokenizer = build(files, args.device, args.small)
    results = [line("setup", True, f"{name}; torch {torch.__version__}, transformers {transformers.__version__}; "
                    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M random weights in {model.dtype}", started)]
    steps = 3 if args.small else 10
    results.append(check_finetune(model, tokenizer, steps))
    if not args.no_4bit:
        results += [check_qlora(model, tokenizer, method, steps) for method in ("ga", "npo")]
    results += list(check_sampler(model, tokenizer, 400 if args.small else 4000))
    results.append(check_speed(model, tokenizer, *((2, 8, 8) if args.small else (8, 64, 48))))
    print(f"gpu_check: {sum(results)} of {len(results)} checks ok in {time.perf_counter() - started:.0f} s")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
