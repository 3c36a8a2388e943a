"""One-shot check of the GPU code paths on a bare CUDA machine (issue: the first GPU).

Weights cannot travel to such a machine, so the check builds a model of SmolLM2-135M's shape with
random weights from its config and tokenizer files (a few MB; `--export-files DIR` writes them
here from the embedded model), and runs, printing one line per check:

1. `finetune`: LoRA fine-tuning steps on a few QA pairs (the loss must fall);
2. `qlora_ga`, `qlora_npo`, `qlora_ga_eo`: the model reloaded in 4-bit NF4 (bitsandbytes), a fresh
   LoRA adapter (QLoRA; gradient checkpointing on a GPU), unlearning steps with GA, with NPO (whose
   reference model is the same weights with the adapter disabled) and with GA + [P1]'s entropy term
   over every position of batches padded to 64 (the forget NLL must rise; peak GPU memory printed);
3. `float16`: a T4's numerics (`hardware.precision` below compute capability 8.0): float16 weights,
   float32 adapters, loss scaling; fine-tuning lowers the loss, GA raises the forget NLL, all finite;
4. `load_model`: the model saved as a directory and loaded by `models.load_model` (the notebooks'
   path) computes the same logits; reloaded in 4-bit, our sampler draws from it;
5. `frozen_trunk`: an adapter on the top half of the blocks, the loss through `answers.FrozenTrunk`
   equal to the plain forward's;
6. `sampler_exact`: our sampler's first tokens against the model's exact next-token probabilities
   (chi-square over the likely tokens, p above 1e-4);
7. `sampler_batch`: the same answers whatever the batch size and loop (static or prefix; float32);
8. `batch_changes`: the share of answers that change with the batch size in the GPU's dtype
   (bfloat16 rounds differently in another batch; reported, and must stay a minority);
9. `memory_<model>`: phi-1.5 and Llama-3.2-1B shapes with random weights: [P1]'s n = 128 answers of
   128 tokens at the batch our sampler plans for a 24 GB budget, a LoRA step of 32 rows of 256
   tokens with gradient checkpointing, and the same step in parts of 8 rows (`unlearn`'s
   micro-batches); each measured peak against its `memory` plan (at most the plan, at least a third
   of it), the parts' below the whole step's;
10. `speed`: tokens per second of our sampler (its static loop, a GPU's default, and its prefix loop)
   and of `model.generate` on the same workload, and the peak GPU memory; on a GPU ours (static) must
   be at least as fast;
11. `notebooks` (with `--notebooks`): the smoke profile's notebooks 01-05 run by papermill on this
   device, `MODEL` set to the random-weight model saved as a folder: each must run and write what
   the next one reads (their findings mean nothing on random weights); the time of each is printed.

Needs torch (CUDA), transformers, peft, accelerate, safetensors, numpy, scipy, pandas, tqdm and, for
the 4-bit checks, bitsandbytes; for `--notebooks` also papermill, its kernel (ipykernel), datasets,
rouge-score, matplotlib and seaborn. It imports probunlearn from `lib/` of this checkout (and hands
that folder to the notebooks' kernels). A bare GPU machine lacks some of them and cannot download:
`benchmarks/gpu_bundle.py` gathers here, in `gpu-bundle/`, the wheels such a machine lacks (at this
project's lock), bitsandbytes cut to its CUDA 13 libraries, and the model's config and tokenizer
files, with the command to run there (it prints it).

    python benchmarks/gpu_bundle.py                                  # here: gpu-bundle/ and the command
    python benchmarks/gpu_check.py --files gpu-bundle/smollm2-files --notebooks   # there: < 10 min
    python benchmarks/gpu_check.py --device cpu --small             # the dry run the tests do here
    python benchmarks/gpu_check.py --export-files smollm2-files     # here: config + tokenizer only
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lib"))  # a bare machine: the package is not installed

import numpy as np  # noqa: E402
import torch  # noqa: E402

FILES_DIR: Path | None = None  # the config and tokenizer files the check builds its models from (main)
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
    from probunlearn.hardware import precision

    dtype = precision(device).weights if device == "cuda" else torch.float32  # float16 below compute capability 8.0
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


def check_qlora(model, tokenizer, method: str, steps: int, entropy: bool = False) -> bool:
    from probunlearn.likelihood import answer_nll
    from probunlearn.models import add_lora
    from probunlearn.objectives import entropy_regulariser
    from probunlearn.quantization import quantized_copy
    from probunlearn.unlearning import unlearn

    started = time.perf_counter()
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    quantized = quantized_copy(model, "4bit")  # in the model's dtype
    peft_model = add_lora(quantized, r=8, lora_alpha=16, gradient_checkpointing=cuda)
    forget, retain = records(QA[:3]), records(QA[3:])
    questions, answers = [r["question"] for r in forget], [r["answer"] for r in forget]
    before = float(np.mean(answer_nll(peft_model, tokenizer, questions, answers)))
    regularisers = [entropy_regulariser(1.0, -0.25, "all")] if entropy else []  # [P1]'s EO, its code's averaging
    run = unlearn(peft_model, tokenizer, forget, retain, method=method, steps=steps, learning_rate=5e-3, batch_size=3,
                  regularisers=regularisers, pad_to=64 if entropy else None, progress=False)
    after = float(np.mean(answer_nll(peft_model, tokenizer, questions, answers)))
    finite = all(np.isfinite(row["loss"]) for row in run.log)
    layer = type(peft_model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
    name = f"qlora_{method}" + ("_eo" if entropy else "")
    return line(name, after > before and finite,
                f"4-bit base ({layer}), {steps} steps, forget NLL {before:.3f} -> {after:.3f}{peak}", started)


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
    questions = [q for q, _ in QA[:3]]
    a = sample_token_ids(model, tokenizer, questions, num_samples=8, max_new_tokens=12, seed=3, batch_size=5,
                         loop="static", progress=False)
    b = sample_token_ids(model, tokenizer, questions, num_samples=8, max_new_tokens=12, seed=3, batch_size=24,
                         loop="prefix", progress=False)
    same = a == b
    batch = line("sampler_batch", same, "3 questions x 8 answers x 12 tokens: the static loop in batches of 5 and the "
                 "prefix loop in one of 24 give " + ("the same answers" if same else "different answers"), started)
    return exact, batch


def forget_nll(model, tokenizer, pairs) -> float:
    from probunlearn.likelihood import answer_nll

    return float(np.mean(answer_nll(model, tokenizer, [q for q, _ in pairs], [a for _, a in pairs])))


def check_float16(model, tokenizer, steps: int) -> bool:
    from probunlearn.hardware import precision
    from probunlearn.models import add_lora
    from probunlearn.training import train_lora
    from probunlearn.unlearning import unlearn

    started = time.perf_counter()
    device = model.device.type
    half = add_lora(copy.deepcopy(model).half(), r=8, lora_alpha=16)
    trained = {p.dtype for p in half.parameters() if p.requires_grad}
    log = train_lora(half, tokenizer, records(QA), epochs=steps, learning_rate=5e-3, batch_size=len(QA), progress=False)
    before = forget_nll(half, tokenizer, QA[:3])
    run = unlearn(half, tokenizer, records(QA[:3]), records(QA[3:]), method="ga", steps=steps, learning_rate=5e-3,
                  batch_size=3, progress=False)
    after = forget_nll(half, tokenizer, QA[:3])
    losses = [row["loss"] for row in log + run.log]
    ok = (trained == {torch.float32} and np.isfinite(losses).all() and log[-1]["loss"] < log[0]["loss"]
          and after > before and "loss_scale" in run.log[-1])
    gpu = (f"; this GPU (capability {'.'.join(map(str, torch.cuda.get_device_capability()))}) runs "
           f"{str(precision(device).weights).removeprefix('torch.')}" if device == "cuda" else "")
    return line("float16", ok, f"adapters {sorted(str(d).removeprefix('torch.') for d in trained)}, fine-tune loss "
                f"{log[0]['loss']:.3f} -> {log[-1]['loss']:.3f}, GA forget NLL {before:.3f} -> {after:.3f}, loss scale "
                f"{run.log[-1]['loss_scale']:.0f}{gpu}", started)


def check_load_model(model, tokenizer, quantized: bool) -> bool:
    from probunlearn.models import encode_prompt, load_model
    from probunlearn.sampling import sample_token_ids

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-model-") as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        loaded, loaded_tokenizer = load_model(folder, dtype=model.dtype, device=model.device.type)
        ids = torch.tensor([encode_prompt(loaded_tokenizer, QA[0][0])], device=model.device)
        with torch.no_grad():
            same = torch.allclose(loaded(input_ids=ids).logits.float(), model(input_ids=ids).logits.float(), atol=1e-3)
        detail = f"logits of load_model({'same' if same else 'DIFFERENT'})"
        drawn = True
        if quantized:
            four, _ = load_model(folder, quantization="4bit", device=model.device.type)
            answers = sample_token_ids(four, loaded_tokenizer, [QA[0][0]], num_samples=16, max_new_tokens=8, seed=0,
                                       progress=False)[0]
            drawn = len(answers) == 16 and any(answers)
            detail += f"; 4-bit reload sampled {len(answers)} answers"
    return line("load_model", same and drawn, detail, started)


def check_frozen_trunk(model, tokenizer) -> bool:
    from probunlearn.answers import FrozenTrunk, answer_loss
    from probunlearn.models import add_lora, encode_qa, num_layers

    started = time.perf_counter()
    peft_model = add_lora(copy.deepcopy(model), r=8, lora_alpha=16, top_layers=max(1, num_layers(model) // 2))
    batch = encode_qa(tokenizer, [q for q, _ in QA], [a for _, a in QA])
    batch = {k: v.to(model.device) for k, v in batch.items()}
    trunk = FrozenTrunk(peft_model)
    with torch.no_grad():
        plain, kept = float(answer_loss(peft_model, batch)), float(answer_loss(peft_model, batch, trunk))
    ok = trunk.enabled and abs(plain - kept) <= 1e-2 * abs(plain)
    return line("frozen_trunk", ok, f"trunk {'on' if trunk.enabled else 'OFF'} below block {trunk.first}, loss "
                f"{kept:.4f} against {plain:.4f} without it", started)


def check_batch_changes(model, tokenizer, samples: int) -> bool:
    from probunlearn.sampling import sample_token_ids

    started = time.perf_counter()
    questions = [q for q, _ in QA[:4]]
    a = sample_token_ids(model, tokenizer, questions, num_samples=samples, max_new_tokens=24, seed=5, batch_size=16,
                         progress=False)
    b = sample_token_ids(model, tokenizer, questions, num_samples=samples, max_new_tokens=24, seed=5,
                         batch_size=4 * samples, progress=False)
    pairs = [(x, y) for qa, qb in zip(a, b) for x, y in zip(qa, qb)]
    changed = sum(x != y for x, y in pairs) / len(pairs)
    return line("batch_changes", changed < 0.5, f"{changed:.1%} of {len(pairs)} answers change between batches of 16 "
                f"and {4 * samples} in {str(model.dtype).removeprefix('torch.')}", started)


def check_memory(name: str, config, device: str, small: bool) -> bool:
    """Measured peak GPU memory of sampling at [P1]'s sizes and of a LoRA step, against `memory`'s plans."""
    from probunlearn import memory
    from probunlearn.models import add_lora, encode_prompt
    from probunlearn.objectives import StepOutputs, step_counts
    from probunlearn.sampling import planned_rows, sample_token_ids
    from probunlearn.unlearning import step_parts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    if small:
        config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                       "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 49152})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    samples, tokens, rows, width = (8, 8, 4, 32) if small else (128, 128, 32, 256)
    part = rows // 4  # rows of one micro-batch
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(FILES_DIR)  # SmolLM2's: token ids below every vocabulary here
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    shape = memory.Shape.of(config, name)
    questions = [q for q, _ in QA[:2]]
    cuda = device == "cuda"
    os.environ["PROBUNLEARN_GPU_MEMORY_GB"] = "24"
    try:
        batch = planned_rows(model, tokenizer, questions, [(i, j) for i in range(2) for j in range(samples)], tokens)
        positions = max(len(encode_prompt(tokenizer, q)) for q in questions) + tokens
        plan = memory.sampling_plan(shape, rows=min(batch, 2 * samples), positions=positions, rows_per_prompt=samples,
                                    dtype=dtype)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sample_token_ids(model, tokenizer, questions, num_samples=samples, max_new_tokens=tokens, seed=0, progress=False)
        sampled = torch.cuda.max_memory_allocated() if cuda else 0
    finally:
        del os.environ["PROBUNLEARN_GPU_MEMORY_GB"]
    peft_model = add_lora(model, r=32, lora_alpha=64, gradient_checkpointing=True)
    ids = torch.randint(0, 49152, (rows, width), device=device)
    labels = ids.clone()
    labels[:, : width // 2] = -100
    step_batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    train_plan = memory.training_plan(shape, tokens=rows * width, answer_tokens=rows * (width // 2), lora_r=32,
                                      dtype=dtype, quantization=None, gradient_checkpointing=True)
    part_plan = memory.training_plan(shape, tokens=part * width, answer_tokens=part * (width // 2), lora_r=32,
                                     dtype=dtype, quantization=None, gradient_checkpointing=True)
    peft_model.train()
    peaks, gradients = [], []
    for micro in (None, part):  # the whole step, then in parts (unlearning.step_parts, StepOutputs.mean)
        peft_model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        batches = {"forget": step_batch}
        counts = step_counts(batches)
        for piece in step_parts(batches, micro):
            StepOutputs(peft_model, piece, counts=counts).nll("forget").backward()
        peaks.append(torch.cuda.max_memory_allocated() if cuda else 0)
        gradients.append(torch.cat([p.grad.float().flatten() for p in peft_model.parameters() if p.grad is not None]))
    trained, in_parts = peaks
    same = torch.allclose(gradients[0], gradients[1], rtol=2e-2, atol=1e-4 * float(gradients[0].abs().max()))
    within = lambda measured, plan: plan.total - memory.OVERHEAD >= measured >= (plan.total - memory.OVERHEAD) / 3
    ok = same and ((within(sampled, plan) and within(trained, train_plan) and within(in_parts, part_plan)
                    and in_parts < trained) if cuda else batch >= 1)
    gb = lambda b: f"{b / memory.GB:.1f}"
    detail = (f"{shape.params / 1e9:.2f} B parameters; sampling {len(questions)} x {samples} x {tokens} at the planned "
              f"batch {batch}: {gb(sampled)} GB measured, plan {gb(plan.total - memory.OVERHEAD)}; LoRA step of "
              f"{rows} x {width} tokens, checkpointed: {gb(trained)} GB measured, plan "
              f"{gb(train_plan.total - memory.OVERHEAD)}; in parts of {part} rows: {gb(in_parts)} GB measured, plan "
              f"{gb(part_plan.total - memory.OVERHEAD)}, gradients {'the same' if same else 'DIFFERENT'} "
              f"(plans without the {gb(memory.OVERHEAD)} GB of overhead)")
    del model, peft_model
    if cuda:
        torch.cuda.empty_cache()
    return line(f"memory_{name}", ok, detail, started)


def check_speed(model, tokenizer, questions: int, samples: int, tokens: int) -> bool:
    from probunlearn.models import format_prompt
    from probunlearn.sampling import sample_token_ids

    started = time.perf_counter()
    prompts = [f"{q} ({i})" for i in range(questions) for q, _ in QA[:1]]
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    rates = {}
    for loop in ("static", "prefix"):  # a GPU's default first; the prefix loop (a CPU's) waits for the GPU every step
        tick = time.perf_counter()
        ours = sample_token_ids(model, tokenizer, prompts, num_samples=samples, max_new_tokens=tokens, seed=0,
                                loop=loop, progress=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        rates[loop] = sum(len(a) for per_question in ours for a in per_question) / (time.perf_counter() - tick)
    tick, generated = time.perf_counter(), 0
    for prompt in prompts:
        batch = tokenizer(format_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out = model.generate(**batch, do_sample=True, num_return_sequences=samples, max_new_tokens=tokens,
                                 top_k=0, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        generated += int((new != tokenizer.pad_token_id).sum())
    generate_seconds = time.perf_counter() - tick
    cuda = model.device.type == "cuda"
    memory = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
    ours_rate, generate_rate = rates["static" if cuda else "prefix"], generated / generate_seconds
    verdict = f"ours {ours_rate / generate_rate:.1f}x generate" if cuda else "not compared in the dry run"
    return line("speed", ours_rate >= generate_rate or not cuda,
                f"ours {rates['static']:.0f} tokens/s with the static loop, {rates['prefix']:.0f} with the prefix loop; "
                f"model.generate {generate_rate:.0f} tokens/s: {verdict} ({questions} x {samples} x {tokens}){memory}",
                started)


NOTEBOOKS = ("01", "02", "03", "04", "05")


def check_notebooks(model, tokenizer, profile: str = "smoke", numbers=NOTEBOOKS, overrides: dict | None = None) -> bool:
    """The notebooks `numbers` of `profile` run in order by papermill on the model's device, with
    MODEL the random-weight model saved as a folder (and `overrides` of other settings); each must
    finish and leave what it writes last (`reproduce.FINISHED`). Their numbers are those of random
    weights: only that they run is checked."""
    import papermill as pm

    from probunlearn import reproduce

    started = time.perf_counter()
    lib = str(Path(__file__).resolve().parents[1] / "lib")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (lib, os.environ.get("PYTHONPATH")) if p)  # the kernels
    times, ok = [], True
    with tempfile.TemporaryDirectory(prefix="gpu-check-notebooks-") as folder:
        root, saved = Path(folder), Path(folder) / "random-model"
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
        results, figures = root / "results", root / "figures"
        for notebook in reproduce.notebooks():
            number = notebook.name[:2]
            if number not in numbers:
                continue
            parameters = reproduce.parameters_for(notebook, profile, results, figures)
            parameters.update({k: v for k, v in {**(overrides or {}), "MODEL": str(saved)}.items() if k in parameters})
            tick = time.perf_counter()
            try:
                pm.execute_notebook(str(notebook), str(root / notebook.name), parameters=parameters,
                                    cwd=str(notebook.parent), kernel_name="python3", progress_bar=False,
                                    kernel_manager_class=reproduce.NotebookKernelManager)
                finished = (results / profile / reproduce.FINISHED[number]).exists()
            except Exception as error:  # noqa: BLE001 - reported on the check's line, the next notebooks skipped
                print(f"  {notebook.name}: {type(error).__name__}: {str(error).strip().splitlines()[-1][:300]}")
                finished = False
            times.append(f"{number} {time.perf_counter() - tick:.0f} s" + ("" if finished else " FAILED"))
            if not finished:
                ok = False
                break
    return line("notebooks", ok and len(times) == len(numbers),
                f"profile {profile}, MODEL = the random-weight model, on {model.device.type}: " + ", ".join(times), started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=Path, help="folder with config.json and the tokenizer files (default: the embedded model's)")
    parser.add_argument("--export-files", type=Path, metavar="DIR", help="write the config and tokenizer files to DIR and stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a 2-block model and small workloads (the CPU dry run)")
    parser.add_argument("--no-4bit", action="store_true", help="skip the QLoRA checks (no bitsandbytes)")
    parser.add_argument("--notebooks", nargs="?", const=",".join(NOTEBOOKS), default=None, metavar="01,02,...",
                        help="also run these smoke notebooks with the random-weight model (default 01-05)")
    parser.add_argument("--notebooks-only", action="store_true", help="with --notebooks: that check alone")
    args = parser.parse_args(argv)
    if args.export_files:
        export_files(args.export_files)
        return 0
    files = args.files
    if files is None:
        from probunlearn.models import embedded_model_dir

        files = embedded_model_dir()
    import transformers

    global FILES_DIR
    FILES_DIR = files
    started = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    model, tokenizer = build(files, args.device, args.small)
    dtype = model.dtype
    results = [line("setup", True, f"{name}; torch {torch.__version__}, transformers {transformers.__version__}; "
                    f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M random weights in {model.dtype}", started)]
    small = {"LORA_TOP_LAYERS": None} if args.small else {}  # the small model has 2 blocks
    if args.notebooks and args.notebooks_only:
        ok = check_notebooks(model, tokenizer, numbers=tuple(args.notebooks.split(",")), overrides=small)
        print(f"gpu_check: {'1 of 1 check ok' if ok else 'the notebooks check failed'} in {time.perf_counter() - started:.0f} s")
        return 0 if ok else 1
    steps = 3 if args.small else 10
    results.append(check_finetune(model, tokenizer, steps))
    if not args.no_4bit:
        results += [check_qlora(model, tokenizer, method, steps) for method in ("ga", "npo")]
        results.append(check_qlora(model, tokenizer, "ga", steps, entropy=True))
    results.append(check_float16(model, tokenizer, steps))
    results.append(check_load_model(model, tokenizer, quantized=not args.no_4bit))
    results.append(check_frozen_trunk(model, tokenizer))
    results += list(check_sampler(model.float(), tokenizer, 400 if args.small else 4000))
    model = model.to(dtype)  # back to the GPU's dtype
    results.append(check_batch_changes(model, tokenizer, 8 if args.small else 64))
    results.append(check_speed(model, tokenizer, *((2, 8, 8) if args.small else (8, 64, 48))))
    if args.notebooks:
        results.append(check_notebooks(model, tokenizer, numbers=tuple(args.notebooks.split(",")), overrides=small))
    del model
    from probunlearn.memory import paper_configs

    for name, config in paper_configs().items():
        results.append(check_memory(name, config, args.device, args.small))
    print(f"gpu_check: {sum(results)} of {len(results)} checks ok in {time.perf_counter() - started:.0f} s")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
