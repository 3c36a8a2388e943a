"""Fine-tuning: a readable LoRA / QLoRA training loop (plain PyTorch, seeded, tqdm, loss log).

`finetune` teaches the base model the fictitious authors: on all authors it gives the *target*
model (which the unlearning methods start from), on retain authors only the *retain* model (the
reference that Forget Quality compares against; TOFU's `retain90`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from probunlearn.answers import FrozenTrunk, answer_loss, answer_positions
from probunlearn.hardware import loss_scaler, model_device
from probunlearn.models import (AnswerOnlyCollator, META_FILE, add_lora, format_prompt, load_model, load_tokenizer,
                                save_adapter, training_attention)
from probunlearn.utils import load_json, save_json, set_seed


def train_lora(model, tokenizer, dataset, *, epochs: int, learning_rate: float, batch_size: int,
               seed: int = 0, max_length: int | None = None, warmup_ratio: float = 0.05,
               weight_decay: float = 0.0, micro_batch_size: int | None = None, progress: bool = True,
               desc: str = "fine-tune") -> list[dict]:
    """Minimise the answer-only NLL of `dataset` over the trainable (LoRA) parameters of `model`.
    AdamW with linear warm-up and decay; with float16 weights the loss is scaled
    (`hardware.loss_scaler`). Returns the loss log: one dict per optimiser step.
    The blocks below the adapter run once per example (`answers.FrozenTrunk`), the output head on
    answer positions only (`answers.answer_loss`). `micro_batch_size`: run each batch in parts of
    this many rows and add their gradients, each part's loss weighted by its share of the batch's
    answer tokens: the step of the whole batch (up to rounding), with the activations of one part in
    memory (`memory.training_plan`: relearning on 200 TOFU questions at once plans 264 GB for
    phi-1.5). None: the whole batch at once."""
    if not hasattr(model, "peft_config"):
        raise ValueError("train_lora trains a LoRA adapter and the model has none: wrap it with "
                         "probunlearn.models.add_lora first")
    set_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, collate_fn=AnswerOnlyCollator(tokenizer, max_length),
        generator=torch.Generator().manual_seed(seed),
    )
    total = epochs * len(loader)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    warmup = max(1, int(warmup_ratio * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    device = model_device(model)
    trunk = FrozenTrunk(model)
    scaler = loss_scaler(model)  # float16 weights (a T4): the loss is scaled so small gradients survive
    model.train()
    log, step, start = [], 0, time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress)
    with training_attention(model):  # nothing but training steps in this loop
        for epoch in range(epochs):
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                answers = int(answer_positions(batch["labels"]).sum())
                loss = 0.0
                for part in micro_batches(batch, micro_batch_size):
                    share = int(answer_positions(part["labels"]).sum()) / answers
                    part_loss = answer_loss(model, part, trunk) * share
                    if not math.isfinite(part_loss.item()):
                        raise FloatingPointError(f"{desc}: loss became {part_loss.item()} at step {step}; "
                                                 "lower the learning rate")
                    scaler.scale(part_loss).backward()
                    loss += part_loss.detach()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                log.append({"step": step, "epoch": epoch + 1, "loss": loss.item(),
                            "lr": schedule.get_last_lr()[0], "seconds": time.perf_counter() - start})
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return log


def micro_batches(batch: dict, size: int | None):
    """The rows of a collated batch in consecutive parts of at most `size` rows (None: the batch)."""
    rows = len(batch["input_ids"])
    if size is None or size >= rows:
        yield batch
        return
    if size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {size}")
    for start in range(0, rows, size):
        yield {k: v[start:start + size] for k, v in batch.items()}


def data_fingerprint(dataset) -> str:
    """A short hash of the questions and answers: part of the key that decides whether a saved
    model can be reused."""
    digest = hashlib.sha256(json.dumps([list(dataset["question"]), list(dataset["answer"])]).encode())
    return digest.hexdigest()[:16]


def finetune(dataset, out_dir: str | os.PathLike, *, base: str = "smollm2-135m", quantization: str | None = None,
             epochs: int = 10, learning_rate: float = 1e-3, batch_size: int = 16, lora_r: int = 32,
             lora_alpha: int = 64, lora_top_layers: int | None = None, seed: int = 0, max_length: int | None = None,
             progress: bool = True, desc: str = "fine-tune", reuse: bool = True):
    """Load `base`, LoRA-fine-tune it on `dataset` and save the adapter to `out_dir` (which then
    loads with `probunlearn.models.load_model(out_dir)` in seconds). Returns `(model, tokenizer, log)`.

    With `reuse=True`, an adapter already in `out_dir` that was trained with the same settings on
    the same data (see `data_fingerprint`) is loaded instead of trained again, so a re-run
    notebook resumes where it stopped.

    The model returned is `load_model(out_dir)`'s, trained now or reused: the model as every later
    notebook loads it (an adapter on a plain model merged into its base), so notebook 02 scores the
    same model either way. (Until 2026-12-06 a model trained now was returned with its adapter beside
    the weights: on the cpu profile that in-memory model and its merged copy gave different greedy
    answers to 4 of the 64 forget questions of the retain and partial models, and the partial
    control's greedy keyword hit read 0.47 after training against 0.44 when reused.)
    """
    settings = {"base": str(base), "quantization": quantization, "epochs": epochs, "learning_rate": learning_rate,
                "batch_size": batch_size, "lora_r": lora_r, "lora_alpha": lora_alpha, "lora_top_layers": lora_top_layers,
                "seed": seed, "max_length": max_length, "prompt": format_prompt(load_tokenizer(base), "{question}"),
                "data": data_fingerprint(dataset)}
    out_dir = Path(out_dir)
    if (reuse and (out_dir / META_FILE).exists() and (out_dir / "train_log.json").exists()
            and load_json(out_dir / META_FILE).get("settings") == settings):
        print(f"{desc}: reusing {out_dir} (trained earlier with the same settings and data)")
        log = load_json(out_dir / "train_log.json")
    else:
        set_seed(seed)
        model, tokenizer = load_model(base, quantization=quantization)
        model = add_lora(model, r=lora_r, lora_alpha=lora_alpha, top_layers=lora_top_layers,
                         gradient_checkpointing=model_device(model).type == "cuda")  # memory, where it is short
        log = train_lora(model, tokenizer, dataset, epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
                         seed=seed, max_length=max_length, progress=progress, desc=desc)
        save_adapter(model, out_dir, base=base, extra={"settings": settings, "num_examples": len(dataset)})
        save_json(log, out_dir / "train_log.json")
        del model
    model, tokenizer = load_model(out_dir, quantization=quantization)  # trained now or reused: as later notebooks load it
    return model, tokenizer, log
