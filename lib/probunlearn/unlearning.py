"""The unlearning loop and the evaluations it runs (SPEC §2-4): one LoRA unlearning loop for every
objective of `objectives` (or full fine-tuning, [P1]'s recipe), with checkpoints for early stopping, and the greedy and likelihood
numbers of the comparison table. The two controls of excessive unlearning live in `control`.

Papers: [P3] Yao, Xu, Liu, *Large Language Model Unlearning*; TOFU, Maini et al. 2024; [P2] Wang et
al., *Unlearning with Control*; [P1] Scholten et al., ICLR 2025.

How the pieces fit (notebook 03 calls them in this order):

- `start_unlearning(target_dir)`: the fine-tuned target (adapter merged) with a fresh LoRA adapter;
  `reset_adapter(model, seed)` starts it again, freshly initialised for another seed.
- `unlearn(model, tokenizer, forget_set, retain_set, method=...)`: AdamW on the adapter; each
  forget batch is paired with a retain batch; `evaluate` runs every `eval_every` steps and a copy
  of the adapter is kept at each evaluation (cheap with LoRA), for early stopping.
- `control.early_stopping(trace, bar)` and `control.choose_mixing(model, score, bar)` (with
  `control.mixed_model`): the two controls of [P2].
- `start_full_unlearning(target_dir)`: [P1]'s recipe instead, every weight trainable in float32
  (notebook 04), trained by the same `unlearn` with `compute_dtype=torch.bfloat16` and stopped by
  `stop_when` once it has crossed the utility bar (`comparison.run_to_bar`).
- `evaluate_unlearning(...)`: the row of the comparison table (greedy ROUGE-L, keyword hits,
  utility accuracy, Forget Quality against the retain model, Model Utility).
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from probunlearn.answers import FrozenTrunk
from probunlearn.hardware import loss_scaler, model_device, precision
from probunlearn.models import (STACKED, AnswerOnlyCollator, add_lora, attach_reference, encode_qa, is_stacked, load_model,
                                stack_lora, training_attention)
from probunlearn.objectives import StepOutputs, check_hparams, method_objective, step_counts
from probunlearn.utils import set_seed

# ----------------------------------------------------------------------------- data for the loop
def mismatch_pairs(forget_records: Sequence[dict], answer_pool: Sequence[dict], *, per_prompt: int,
                   rng: random.Random) -> tuple[list[str], list[str]]:
    """[P3]'s random mismatch: each forget question paired with `per_prompt` answers drawn from
    `answer_pool` records of *other* authors (never the forget record's own author).
    Returns `(questions, answers)`, `per_prompt` rows per forget record."""
    if per_prompt < 1:
        raise ValueError(f"per_prompt must be >= 1, got {per_prompt}")
    questions, answers = [], []
    for record in forget_records:
        others = [r["answer"] for r in answer_pool if r["author"] != record["author"]]
        if not others:
            raise ValueError(f"no answers of authors other than {record['author']!r} to draw mismatches from")
        for _ in range(per_prompt):
            questions.append(record["question"])
            answers.append(rng.choice(others))
    return questions, answers


def _cycle(dataset, batch_size: int, seed: int):
    """Endless shuffled mini-batches of records (a new permutation each pass)."""
    rng = random.Random(seed)
    records = [dataset[i] for i in range(len(dataset))]
    while True:
        order = list(range(len(records)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [records[i] for i in order[start:start + batch_size]]


def step_parts(batches: Mapping[str, dict], micro_batch_size: int | None):
    """The batches of one step in parts of at most `micro_batch_size` forget rows (None: one part,
    the whole step): every batch is cut into the same number of consecutive parts, as equal as
    they come, so each part pairs its forget rows with a matching share of the retain and mismatch
    rows (never fewer parts than rows in the smallest batch, so no part lacks a batch)."""
    if micro_batch_size is None:
        yield batches
        return
    rows = {name: int(b["input_ids"].shape[0]) for name, b in batches.items()}
    parts = min(math.ceil(rows.get("forget", max(rows.values())) / micro_batch_size), min(rows.values()))
    if parts <= 1:
        yield batches
        return
    pieces = {name: {key: value.tensor_split(parts) for key, value in batch.items()} for name, batch in batches.items()}
    for k in range(parts):
        yield {name: {key: split[k] for key, split in batch.items()} for name, batch in pieces.items()}


# ----------------------------------------------------------------------------- checkpoints
DISK_CHECKPOINT_BYTES = 32 * 2**20  # adapters larger than this are checkpointed to disk (`unlearn`)


class DiskCheckpoints(MutableMapping):
    """Checkpoints {step: adapter state} kept as safetensors files in a temporary folder (removed
    with this object) and read back when asked for: a run's host memory then holds one state at a
    time. On the paper profile an adapter of phi-1.5 (r = 32, every linear layer) is ~110 MB, and
    notebook 03 evaluates 13 times in each of 18 runs: ~25 GB in memory."""

    def __init__(self):
        from safetensors.torch import load_file, save_file

        self._save, self._load = save_file, load_file
        self.folder = Path(tempfile.mkdtemp(prefix="probunlearn-checkpoints-"))
        self._steps: list[int] = []
        weakref.finalize(self, shutil.rmtree, self.folder, True)

    def _path(self, step: int) -> Path:
        return self.folder / f"step{int(step)}.safetensors"

    def __setitem__(self, step: int, state: Mapping[str, torch.Tensor]) -> None:
        self._save({k: v.contiguous() for k, v in state.items()}, str(self._path(step)))
        if step not in self._steps:
            self._steps.append(step)

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        if step not in self._steps:
            raise KeyError(step)
        return self._load(str(self._path(step)))

    def __delitem__(self, step: int) -> None:
        self._steps.remove(step)
        self._path(step).unlink()

    def __iter__(self):
        return iter(list(self._steps))

    def __len__(self) -> int:
        return len(self._steps)


# ----------------------------------------------------------------------------- the loop
@dataclass
class UnlearningRun:
    """What `unlearn` returns. `log`: one dict per optimiser step (loss and its terms);
    `trace`: one dict per evaluation (step 0 = the target); `checkpoints`: a CPU copy of the
    adapter's trainable tensors at each evaluated step (for early stopping; a `DiskCheckpoints` for
    large adapters); `stopped_at`: the step where `stop_when` ended the run early (None: it ran
    every step)."""

    method: str
    hparams: dict
    log: list[dict] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    checkpoints: MutableMapping[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0
    stopped_at: int | None = None


def start_unlearning(target, *, quantization: str | None = None, lora_r: int = 8,
                     lora_alpha: int | None = None, lora_top_layers: int | None = None, dtype=None,
                     device: str | None = None, gradient_checkpointing: bool | None = None, seed: int = 0):
    """The fine-tuned target (`results/<profile>/models/target`, merged) with a fresh LoRA adapter
    (on the last `lora_top_layers` blocks only, see `models.add_lora`). With `quantization="4bit"`
    (QLoRA) and a target fine-tuned in 4-bit, the target is loaded as it was trained, its 4-bit base
    with its adapter beside it, and the new adapter is stacked beside that (`models.stack_lora`).
    `gradient_checkpointing`: None turns it on on a GPU (the paper profile's steps need it to fit
    24 GB, `memory`), off on a CPU, where memory is not what limits a run.
    Returns `(model, tokenizer)`."""
    set_seed(seed)
    model, tokenizer = load_model(target, quantization=quantization, dtype=dtype, device=device)
    if gradient_checkpointing is None:
        gradient_checkpointing = model_device(model).type == "cuda"
    if hasattr(model, "peft_config"):  # a QLoRA target as trained: its adapter stays, the new one beside it
        return stack_lora(model, r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, top_layers=lora_top_layers,
                          gradient_checkpointing=gradient_checkpointing), tokenizer
    return add_lora(model, r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, top_layers=lora_top_layers,
                    gradient_checkpointing=gradient_checkpointing), tokenizer


def start_full_unlearning(target, *, device: str | None = None, reference: bool = False, seed: int = 0):
    """The fine-tuned target with every weight trainable, in float32 ([P1]'s recipe: full
    fine-tuning, no adapter). Train it with `unlearn(..., compute_dtype=full_tuning_dtype(model))`,
    so that where bfloat16 is fast the products run in bfloat16 while the small updates accumulate
    in float32. `adapter_state` / `load_adapter_state` then copy and restore
    every weight (~0.5 GB for SmolLM2-135M): keep the target's state to start each run from it.
    `reference=True`: a frozen copy of the target in the fast dtype, NPO's and KL's reference
    (`models.attach_reference`; no adapter to switch off here). Returns `(model, tokenizer)`."""
    set_seed(seed)
    model, tokenizer = load_model(target, dtype=torch.float32, device=device)
    if reference:
        attach_reference(model, precision(model_device(model).type).weights)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, tokenizer


def full_tuning_dtype(model) -> torch.dtype | None:
    """The `compute_dtype` for `unlearn` on a `start_full_unlearning` model: the device's fast dtype
    (`hardware.precision(...).autocast`: bfloat16 where the CPU or GPU computes it natively, float16
    on an older GPU, where `unlearn` scales the loss) when it differs from the float32 weights, else
    None (plain float32 steps)."""
    fast = precision(model_device(model).type).autocast
    return fast if fast != next(model.parameters()).dtype else None


TUNINGS = ("full", "lora")


def start_runs(target, tuning: str = "full", *, quantization: str | None = None, lora_r: int = 8,
               lora_top_layers: int | None = None, reference: bool = False, seed: int = 0):
    """The model for a series of runs that each start from the target (notebook 04's dynamics), by
    what they train: `tuning="full"`, every weight in float32 ([P1]'s recipe, `start_full_unlearning`,
    `reference` its frozen copy of the target for NPO and KL); `"lora"`, notebook 03's adapter
    (`start_unlearning`: rank `lora_r` on the last `lora_top_layers` blocks, with `quantization` the
    QLoRA target as trained; NPO's and KL's reference is the model with the adapter switched off, so
    `reference` is not needed).

    Returns `(model, tokenizer, compute_dtype, restart)`: `compute_dtype` for `unlearn` (full: the
    device's fast dtype, `full_tuning_dtype`; lora: None, as notebook 03 trains its adapters), and
    `restart(seed)`, which puts the model back at a run's start: full, the target's weights (the same
    for every seed); lora, a fresh adapter from `seed` (`reset_adapter`: as in notebook 03, the
    adapter's initialisation is part of what a seed draws, the same for every run of that seed)."""
    if tuning not in TUNINGS:
        raise ValueError(f"tuning must be one of {', '.join(TUNINGS)}, got {tuning!r}")
    if tuning == "full":
        model, tokenizer = start_full_unlearning(target, reference=reference, seed=seed)
        initial = adapter_state(model)  # every weight of the target

        def restart(run_seed: int) -> None:
            load_adapter_state(model, initial)

        return model, tokenizer, full_tuning_dtype(model), restart
    model, tokenizer = start_unlearning(target, quantization=quantization, lora_r=lora_r,
                                        lora_top_layers=lora_top_layers, seed=seed)
    return model, tokenizer, None, lambda run_seed: reset_adapter(model, run_seed)


def reset_adapter(model, seed: int) -> None:
    """Initialise the model's LoRA adapter afresh, as peft does (lora_A random, lora_B zero: the
    adapter adds nothing), from `seed`: each seed of a multi-seed comparison starts from its own
    fresh adapter on the same target, without loading the model again."""
    from peft.tuners.lora import LoraLayer

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    stacked = is_stacked(model)  # then only the unlearning adapter, not the target's beneath it
    try:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_A:
                    if not stacked or adapter == STACKED:
                        module.reset_lora_parameters(adapter, True)
    finally:
        torch.random.set_rng_state(generator_state)


def adapter_state(model) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable (adapter) tensors."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """Write an `adapter_state` back into the model (names must match)."""
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise KeyError(f"the model has no parameters {missing[:3]}...; is this the model the state came from?")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device))


@contextlib.contextmanager
def checkpoint_restored(model, state: Mapping[str, torch.Tensor]):
    """Context in which the adapter holds `state` (an early-stopping checkpoint); restored after."""
    current = adapter_state(model)
    load_adapter_state(model, state)
    try:
        yield model
    finally:
        load_adapter_state(model, current)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def unlearn(model, tokenizer, forget_set, retain_set, *, method: str, steps: int, learning_rate: float,
            batch_size: int, hparams: Mapping | None = None, eval_every: int = 0, eval_at: Sequence[int] = (),
            evaluate: Callable | None = None, initial_evaluation: dict | None = None,
            regularisers: Sequence[Callable] = (), mismatch_per_prompt: int = 2, mismatch_pool=None,
            keep_checkpoints: bool | str = True, max_length: int | None = None, pad_to: int | None = None,
            trunk: FrozenTrunk | None = None, compute_dtype: torch.dtype | None = None,
            stop_when: Callable[[list[dict]], bool] | None = None, micro_batch_size: int | None = None,
            seed: int = 0, progress: bool = True, desc: str | None = None) -> UnlearningRun:
    """Train the trainable weights of `model` (a LoRA adapter on the target, from `start_unlearning`,
    or every weight, from `start_full_unlearning`) to minimise the objective `METHODS[method]` plus
    any `regularisers`, for `steps` AdamW steps at a constant `learning_rate` (gradient norm clipped
    at 1).

    Each step pairs a forget batch with a retain batch (both reshuffled every pass), and for
    `ga_mismatch` a batch of forget questions with `mismatch_per_prompt` random answers of other
    authors from `mismatch_pool` (default: `retain_set`).
    `evaluate(model) -> dict` runs before the first step (or `initial_evaluation` is used: the
    step-0 model is the target, the same for every method), every `eval_every` steps, at the steps
    listed in `eval_at`, and after the last; each evaluation is a row of `trace`, and a copy of the
    adapter is kept with it (`keep_checkpoints`: True keeps it in memory, or on disk when the
    trainable weights exceed `DISK_CHECKPOINT_BYTES`; "disk" or "memory" choose; False keeps none).
    `regularisers`: callables `fn(out: StepOutputs) -> {name: tensor}` added to the loss (their
    `uses` and `full_logits` attributes name the batches they read and those they need the logits of
    every position of). `pad_to`: pad every batch to this many positions ([P1]'s code pads to 256;
    only quantities that average over padding notice). `seed` orders the batches (and the random
    mismatch answers); the adapter's initialisation is the caller's (`reset_adapter`). `trunk`: a
    `answers.FrozenTrunk` of the model (default: a new one), which runs the frozen blocks below the
    adapter once per sequence; pass one trunk to every run on the same target to share that work.
    `compute_dtype`: run each step's forward and backward under `torch.autocast` in this dtype while
    the trained weights stay in theirs (full fine-tuning, `start_full_unlearning`: float32 weights,
    bfloat16 products; in bfloat16 weights an AdamW update of lr 1e-5 is below half a unit in the
    last place and rounds away). Where a step computes in float16 (float16 weights or
    `compute_dtype`, an older GPU) the loss is scaled (`hardware.loss_scaler`; the log then has each
    step's `loss_scale`, and a step whose gradients overflowed is skipped). A NaN or infinite loss
    stops the run with a FloatingPointError naming the method and step. `stop_when(trace) -> bool`
    is asked after each evaluation; True ends the run there (`UnlearningRun.stopped_at`: that step;
    None when the run took every step). `micro_batch_size`: run each step in parts of at most this
    many forget rows, each with its share of the retain (and mismatch) rows, and add their gradients:
    every term averages over the whole step's counts (`objectives.StepOutputs.mean`), so the parts
    take the step of the whole batch (up to rounding) with one part's activations in memory
    (`memory.profile_plans`). Rows keep the whole batch's padding. None: the whole batch at once.
    """
    objective = method_objective(method)
    hparams = check_hparams(method, dict(hparams or {}))
    if method == "none" and not regularisers:
        raise ValueError("method 'none' has no loss of its own: give it regularisers (e.g. objectives.entropy_regulariser)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: start from `start_unlearning` "
                         "(or wrap it with probunlearn.models.add_lora)")
    if micro_batch_size is not None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        whole = [getattr(fn, "method_name", None) or getattr(fn, "__name__", repr(fn))
                 for fn in (objective, *regularisers) if not getattr(fn, "parts", False)]
        if whole:
            raise ValueError(f"{', '.join(whole)} average(s) by themselves, so a step in parts would not be the step "
                             "of the whole batch: average through StepOutputs.mean and mark it `parts` "
                             "(objectives.register(..., parts=True)), or set micro_batch_size=None")
    set_seed(seed)
    device = model_device(model)
    collate = AnswerOnlyCollator(tokenizer, max_length, pad_to=pad_to)
    trunk = trunk if trunk is not None else FrozenTrunk(model)
    uses = set(objective.uses).union(*(getattr(r, "uses", ("forget", "retain")) for r in regularisers))
    full_logits = set().union(*(getattr(r, "full_logits", ()) for r in regularisers))
    forget_batches = _cycle(forget_set, batch_size, seed)
    retain_batches = _cycle(retain_set, batch_size, seed + 1)
    pool = list(mismatch_pool if mismatch_pool is not None else retain_set)
    rng = random.Random(seed + 2)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    scaler = loss_scaler(model, compute_dtype)  # float16 products (a T4): scaled so small gradients survive
    extra = {k: v for r in regularisers for k, v in getattr(r, "hparams", {}).items()}
    run = UnlearningRun(method=method, hparams={**hparams, **extra})
    if keep_checkpoints not in (True, False, "memory", "disk"):
        raise ValueError(f"keep_checkpoints must be True, False, 'memory' or 'disk', got {keep_checkpoints!r}")
    trained_bytes = sum(p.numel() * p.element_size() for p in params)
    if keep_checkpoints == "disk" or (keep_checkpoints is True and trained_bytes > DISK_CHECKPOINT_BYTES):
        run.checkpoints = DiskCheckpoints()
    start = time.perf_counter()

    def checkpoint(step: int) -> None:
        if evaluate is None:
            return
        if step == 0 and initial_evaluation is not None:
            row = dict(initial_evaluation)
        else:
            row = evaluate(model)
        run.trace.append({"step": step, **row})
        if keep_checkpoints:
            run.checkpoints[step] = adapter_state(model)
        model.train()

    checkpoint(0)
    model.train()
    last_finite = None
    bar = tqdm(range(1, steps + 1), desc=desc or method, disable=not progress)
    for step in bar:
        forget_records = next(forget_batches)
        batches = {"forget": collate(forget_records)}
        if "retain" in uses:
            batches["retain"] = collate(next(retain_batches))
        if "mismatch" in uses:
            questions, answers = mismatch_pairs(forget_records, pool, per_prompt=mismatch_per_prompt, rng=rng)
            batches["mismatch"] = encode_qa(tokenizer, questions, answers, max_length, pad_to=pad_to)
        batches = {name: {k: v.to(device) for k, v in b.items()} for name, b in batches.items()}
        counts = step_counts(batches)
        summed: dict[str, torch.Tensor] = {}  # each term over the parts, read once per step (one device sync)
        for part in step_parts(batches, micro_batch_size):
            with training_attention(model), _autocast(device, compute_dtype):
                out = StepOutputs(model, part, full_logits=full_logits, trunk=trunk, counts=counts)
                part_terms = dict(objective(out, **hparams))
                for regulariser in regularisers:
                    extra = regulariser(out)
                    clash = set(extra) & set(part_terms)
                    if clash:
                        raise ValueError(f"regulariser term names {sorted(clash)} clash with the objective's terms")
                    part_terms.update(extra)
                for name, term in part_terms.items():
                    summed[name] = summed[name] + term.detach().float() if name in summed else term.detach().float()
                scaler.scale(sum(part_terms.values())).backward()
        terms = dict(zip(summed, torch.stack(list(summed.values())).tolist())) if summed else {}
        value = sum(terms.values())
        if not math.isfinite(value):  # before the optimiser step: the weights keep their last finite values
            where = f"last finite loss {last_finite:.4g} at step {step - 1}" if last_finite is not None \
                else "no finite loss before it"
            raise FloatingPointError(f"{method}: the loss became {value} at step {step} ({where}); terms: {terms}. "
                                     "Lower the learning rate or the number of steps.")
        last_finite = value
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)  # skipped (and the scale halved) where scaled float16 gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scaling = {"loss_scale": scaler.get_scale()} if scaler.is_enabled() else {}
        run.log.append({"step": step, "loss": value, **terms,
                        **scaling, "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{value:.3f}")
        if step == steps or (eval_every and step % eval_every == 0) or step in eval_at:
            model.eval()
            checkpoint(step)
            if stop_when is not None and step < steps and stop_when(run.trace):
                run.stopped_at = step
                break
    bar.close()
    model.eval()
    run.seconds = time.perf_counter() - start
    return run
