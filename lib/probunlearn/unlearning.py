"""Unlearning objectives (SPEC §2), one LoRA unlearning loop, and the control of excessive
unlearning (SPEC §3): early stopping against a utility bar and model mixing.

Papers: [P3] Yao, Xu, Liu, *Large Language Model Unlearning* (GA, GA + random mismatch + KL on
normal data); TOFU, Maini et al. 2024 (GA, grad diff, KL); Zhang et al. 2024, *Negative Preference
Optimization* (NPO, used by [P1] Scholten et al.); [P2] Wang et al., *Unlearning with Control*
(GA on temperature-scaled logits; early stopping and model mixing at a utility bar).

How the pieces fit (notebook 03 calls them in this order):

- `start_unlearning(target_dir)`: the fine-tuned target (adapter merged) with a fresh LoRA adapter.
- `unlearn(model, tokenizer, forget_set, retain_set, method=...)`: AdamW on the adapter; each
  forget batch is paired with a retain batch; `evaluate` runs every `eval_every` steps and a copy
  of the adapter is kept at each evaluation (cheap with LoRA), for early stopping.
- `early_stopping(trace, bar)` and `choose_mixing(model, score, bar)` (with `mixed_model`): the
  two controls of [P2]; `utility_bar(target_score, rho)` is the bar ρ·(target's retain score).
- `evaluate_unlearning(...)`: the row of the comparison table (greedy ROUGE-L, keyword hits,
  utility accuracy, Forget Quality against the retain model, Model Utility).

An objective is a small function `objective(out, **hyper_parameters) -> {term name: loss tensor}`
of a `StepOutputs` (the batches of one step and the model's logits on them, computed on demand and
cached). The loop minimises the sum of the terms. Extra terms (issue 5's entropy regulariser, say)
plug into any objective through `unlearn(..., regularisers=[fn])`, where `fn(out)` returns more
named terms; because `out` caches logits, a regulariser on the forget or retain batch costs no
extra forward pass. π_ref (NPO, KL) is the same weights with the adapter disabled
(`models.reference_model`), never a second copy of the model.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from probunlearn.evaluation import score_answers, split_summary
from probunlearn.models import (
    AnswerOnlyCollator,
    add_lora,
    encode_qa,
    load_model,
    model_device,
    reference_model,
    training_attention,
)
from probunlearn.utils import set_seed

# ----------------------------------------------------------------------------- token-level pieces
# Logits predict the next token: position t scores labels[t + 1]; labels are -100 outside answers.


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits aligned with the tokens they predict, in float32: `(logits[:, :-1], labels[:, 1:],
    mask)`, mask True where the predicted token is an answer token (the positions every answer-only
    quantity averages over, e.g. an entropy regulariser)."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != -100
    return logits, labels, mask


def token_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """NLL of the answer tokens, token mean over the whole batch (SPEC §2 convention; the same
    number as a Hugging Face model's `.loss`). `temperature` divides the logits first
    (T = 1: the plain NLL; `ga_temp` uses T != 1)."""
    logits, labels, mask = answer_logits(logits, labels)
    if not mask.any():
        raise ValueError("the batch has no answer tokens (all labels are -100)")
    return F.cross_entropy((logits / temperature).transpose(1, 2), labels, ignore_index=-100)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(y | x) per sequence: the sum over answer tokens of the token log-probabilities (NPO)."""
    logits, labels, mask = answer_logits(logits, labels)
    token_logp = -F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return (token_logp * mask).sum(dim=1)


def kl_to_reference(reference_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) of the next-token distributions, mean over answer-token positions
    (SPEC §2: per answer token; TOFU's and [P3]'s code average over every position instead)."""
    ref, _, mask = answer_logits(reference_logits, labels)
    cur, _, _ = answer_logits(logits, labels)
    per_position = F.kl_div(F.log_softmax(cur, -1), F.log_softmax(ref, -1), log_target=True,
                            reduction="none").sum(-1)
    return (per_position * mask).sum() / mask.sum()


def npo_loss(logprob: torch.Tensor, reference_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024, eq. 3): −(2/β)·mean log σ(−β·(log π_θ(y|x) − log π_ref(y|x))).

    With log-ratio d, ∂loss/∂d_i = (2/B)·σ(β·d_i): at d = 0, or as β → 0, this is 1/B, the
    gradient of plain gradient ascent on the summed sequence NLL; for d ≪ 0 (already forgotten)
    the weight vanishes, which is what keeps NPO from diverging like GA."""
    if beta <= 0:
        raise ValueError(f"NPO needs beta > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - reference_logprob)).mean()


def answer_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """H̄: mean over answer-token positions of the next-token entropy −Σ_v p_v log p_v (SPEC §2,
    [P1]'s entropy optimisation). [P1]'s code averages over every position, prompt and padding
    included; we mask to the answer tokens, where the forget facts are generated."""
    logits, _, mask = answer_logits(logits, labels)
    if not mask.any():
        raise ValueError("the batch has no answer tokens (all labels are -100)")
    logp = F.log_softmax(logits, dim=-1)
    per_position = -(logp.exp() * logp).sum(dim=-1)
    return (per_position * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------- one step's outputs
class StepOutputs:
    """The batches of one unlearning step and the model's outputs on them, computed on first use
    and cached: `logits(name)` through the adapter (with gradients), `reference_logits(name)`
    under `reference_model` (adapter disabled, no gradients). Batch names: `forget`, `retain`,
    and `mismatch` (forget questions with random answers of other authors) for `ga_mismatch`."""

    def __init__(self, model, batches: Mapping[str, dict]):
        self.model = model
        self.batches = dict(batches)
        self._logits: dict[str, torch.Tensor] = {}
        self._reference: dict[str, torch.Tensor] = {}

    def _batch(self, name: str) -> dict:
        if name not in self.batches:
            raise KeyError(f"this step has no {name!r} batch (it has {', '.join(self.batches)})")
        return self.batches[name]

    def labels(self, name: str) -> torch.Tensor:
        return self._batch(name)["labels"]

    def logits(self, name: str) -> torch.Tensor:
        if name not in self._logits:
            batch = self._batch(name)
            self._logits[name] = self.model(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits
        return self._logits[name]

    def reference_logits(self, name: str) -> torch.Tensor:
        if name not in self._reference:
            batch = self._batch(name)
            with torch.no_grad(), reference_model(self.model):
                self._reference[name] = self.model(input_ids=batch["input_ids"],
                                                   attention_mask=batch["attention_mask"]).logits
        return self._reference[name]

    def nll(self, name: str, temperature: float = 1.0) -> torch.Tensor:
        return token_nll(self.logits(name), self.labels(name), temperature)


# ----------------------------------------------------------------------------- objectives (SPEC §2)
METHODS: dict[str, Callable] = {}


def register(name: str, uses: Sequence[str] = ("forget",)):
    """Add an objective to `METHODS`; `uses` names the batches it reads (the loop builds those)."""
    def wrap(fn):
        fn.method_name, fn.uses = name, tuple(uses)
        METHODS[name] = fn
        return fn
    return wrap


@register("ga")
def ga(out: StepOutputs) -> dict:
    """Gradient ascent ([P3], TOFU): minimise −NLL_θ(D_f)."""
    return {"forget": -out.nll("forget")}


@register("gd", uses=("forget", "retain"))
def gd(out: StepOutputs, alpha: float = 1.0) -> dict:
    """Gradient difference (TOFU): −NLL_θ(D_f) + α·NLL_θ(D_r)."""
    return {"forget": -out.nll("forget"), "retain": alpha * out.nll("retain")}


@register("ga_kl", uses=("forget", "retain"))
def ga_kl(out: StepOutputs, alpha: float = 1.0) -> dict:
    """GA with a KL term on retain data (TOFU, [P3]): −NLL_θ(D_f) + α·KL(π_ref ‖ π_θ) on D_r,
    per answer token. Zero KL before the first step (the fresh adapter is the identity)."""
    kl = kl_to_reference(out.reference_logits("retain"), out.logits("retain"), out.labels("retain"))
    return {"forget": -out.nll("forget"), "kl": alpha * kl}


@register("ga_mismatch", uses=("forget", "retain", "mismatch"))
def ga_mismatch(out: StepOutputs, forget_weight: float = 0.5, mismatch_weight: float = 1.0,
                normal_weight: float = 1.0) -> dict:
    """[P3] Yao et al.: w_f·(−NLL_θ(D_f)) + w_m·NLL_θ(y_rand | x_f) + w_n·KL(π_ref ‖ π_θ) on
    normal data. y_rand: answers of other authors' retain questions (`mismatch_pairs`), several
    per forget prompt; the normal data are our retain questions. Defaults w = (0.5, 1, 1)."""
    kl = kl_to_reference(out.reference_logits("retain"), out.logits("retain"), out.labels("retain"))
    return {"forget": -forget_weight * out.nll("forget"),
            "mismatch": mismatch_weight * out.nll("mismatch"),
            "kl": normal_weight * kl}


@register("npo", uses=("forget", "retain"))
def npo(out: StepOutputs, beta: float = 0.1, alpha: float = 1.0) -> dict:
    """NPO (Zhang et al. 2024, as used by [P1]): `npo_loss` on sequence log-probs summed over
    answer tokens, π_ref = the adapter disabled, plus α·NLL_θ(D_r). β = 0.1."""
    logprob = sequence_logprob(out.logits("forget"), out.labels("forget"))
    reference = sequence_logprob(out.reference_logits("forget"), out.labels("forget"))
    return {"forget": npo_loss(logprob, reference, beta), "retain": alpha * out.nll("retain")}


@register("ga_temp")
def ga_temp(out: StepOutputs, temperature: float = 2.0) -> dict:
    """[P2] Wang et al.: gradient ascent on temperature-scaled logits, −CE(softmax(z/T), y) on D_f.
    T = 2 is the fallback value in the authors' code (`dataloader.py`, loss `ga_temp`)."""
    return {"forget": -out.nll("forget", temperature=temperature)}


def entropy_regulariser(forget_weight: float = 1.0, retain_weight: float = -0.25) -> Callable:
    """[P1] entropy optimisation as a regulariser for any objective (`unlearn(..., regularisers=
    [entropy_regulariser()])`): adds λ_f·H̄_θ(D_f) + λ_r·H̄_θ(D_r) (`answer_entropy`). Defaults
    λ_f = 1 (entropy pushed down on forget questions, so sampling there behaves like greedy
    decoding) and λ_r = −0.25 (kept up on retain questions, so their diversity survives). Reuses
    the step's cached logits: no extra forward pass."""
    def regulariser(out: StepOutputs) -> dict:
        terms = {}
        if forget_weight:
            terms["entropy_forget"] = forget_weight * answer_entropy(out.logits("forget"), out.labels("forget"))
        if retain_weight:
            terms["entropy_retain"] = retain_weight * answer_entropy(out.logits("retain"), out.labels("retain"))
        return terms

    regulariser.hparams = {"entropy_forget_weight": forget_weight, "entropy_retain_weight": retain_weight}
    return regulariser


def method_objective(method: str) -> Callable:
    """The objective registered under `method`, or a ValueError listing the valid names."""
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method]


def method_defaults(method: str) -> dict:
    """The hyper-parameters of a method and their defaults, e.g. {'beta': 0.1, 'alpha': 1.0}."""
    signature = inspect.signature(method_objective(method))
    return {n: p.default for n, p in list(signature.parameters.items())[1:]}


def _check_hparams(method: str, hparams: Mapping) -> dict:
    valid = method_defaults(method)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"{method} takes the hyper-parameters {sorted(valid) or 'none'}; "
                         f"got unknown {unknown}")
    return {**valid, **hparams}


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


# ----------------------------------------------------------------------------- the loop
@dataclass
class UnlearningRun:
    """What `unlearn` returns. `log`: one dict per optimiser step (loss and its terms);
    `trace`: one dict per evaluation (step 0 = the target); `checkpoints`: a CPU copy of the
    adapter's trainable tensors at each evaluated step (for early stopping)."""

    method: str
    hparams: dict
    log: list[dict] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    checkpoints: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    seconds: float = 0.0


def start_unlearning(target, *, quantization: str | None = None, lora_r: int = 8,
                     lora_alpha: int | None = None, dtype=None, device: str | None = None, seed: int = 0):
    """The fine-tuned target (`results/<profile>/models/target`, merged) with a fresh LoRA adapter
    (QLoRA when `quantization="4bit"`). Returns `(model, tokenizer)`."""
    set_seed(seed)
    model, tokenizer = load_model(target, quantization=quantization, dtype=dtype, device=device)
    return add_lora(model, r=lora_r, lora_alpha=lora_alpha or 2 * lora_r), tokenizer


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


def unlearn(model, tokenizer, forget_set, retain_set, *, method: str, steps: int, learning_rate: float,
            batch_size: int, hparams: Mapping | None = None, eval_every: int = 0,
            evaluate: Callable | None = None, initial_evaluation: dict | None = None,
            regularisers: Sequence[Callable] = (), mismatch_per_prompt: int = 2, mismatch_pool=None,
            keep_checkpoints: bool = True, max_length: int | None = None, seed: int = 0,
            progress: bool = True) -> UnlearningRun:
    """Train the LoRA adapter of `model` (a peft model on the target, e.g. from `start_unlearning`)
    to minimise the objective `METHODS[method]` plus any `regularisers`, for `steps` AdamW steps
    at a constant `learning_rate` (gradient norm clipped at 1).

    Each step pairs a forget batch with a retain batch (both reshuffled every pass), and for
    `ga_mismatch` a batch of forget questions with `mismatch_per_prompt` random answers of other
    authors from `mismatch_pool` (default: `retain_set`).
    `evaluate(model) -> dict` runs before the first step (or `initial_evaluation` is used: the
    step-0 model is the target, the same for every method), every `eval_every` steps and after
    the last; each evaluation is a row of `trace`, and a copy of the adapter is kept with it.
    `regularisers`: callables `fn(out: StepOutputs) -> {name: tensor}` added to the loss.
    A NaN or infinite loss stops the run with a FloatingPointError naming the method and step.
    """
    objective = method_objective(method)
    hparams = _check_hparams(method, dict(hparams or {}))
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: start from `start_unlearning` "
                         "(or wrap it with probunlearn.models.add_lora)")
    set_seed(seed)
    device = model_device(model)
    collate = AnswerOnlyCollator(tokenizer, max_length)
    forget_batches = _cycle(forget_set, batch_size, seed)
    retain_batches = _cycle(retain_set, batch_size, seed + 1)
    pool = list(mismatch_pool if mismatch_pool is not None else retain_set)
    rng = random.Random(seed + 2)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    extra = {k: v for r in regularisers for k, v in getattr(r, "hparams", {}).items()}
    run = UnlearningRun(method=method, hparams={**hparams, **extra})
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
    bar = tqdm(range(1, steps + 1), desc=method, disable=not progress)
    for step in bar:
        forget_records = next(forget_batches)
        batches = {"forget": collate(forget_records)}
        if "retain" in objective.uses or regularisers:
            batches["retain"] = collate(next(retain_batches))
        if "mismatch" in objective.uses:
            questions, answers = mismatch_pairs(forget_records, pool, per_prompt=mismatch_per_prompt, rng=rng)
            batches["mismatch"] = encode_qa(tokenizer, questions, answers, max_length)
        batches = {name: {k: v.to(device) for k, v in b.items()} for name, b in batches.items()}
        with training_attention(model):
            out = StepOutputs(model, batches)
            terms = dict(objective(out, **hparams))
            for regulariser in regularisers:
                extra = regulariser(out)
                clash = set(extra) & set(terms)
                if clash:
                    raise ValueError(f"regulariser term names {sorted(clash)} clash with the objective's terms")
                terms.update(extra)
            loss = sum(terms.values())
            value = float(loss.detach())
            if not math.isfinite(value):
                where = f"last finite loss {last_finite:.4g} at step {step - 1}" if last_finite is not None \
                    else "no finite loss before it"
                raise FloatingPointError(
                    f"{method}: the loss became {value} at step {step} ({where}); terms: "
                    f"{ {k: float(v.detach()) for k, v in terms.items()} }. Lower the learning rate or the number of steps."
                )
            last_finite = value
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.log.append({"step": step, "loss": value, **{k: float(v.detach()) for k, v in terms.items()},
                        "seconds": time.perf_counter() - start})
        bar.set_postfix(loss=f"{value:.3f}")
        if step == steps or (eval_every and step % eval_every == 0):
            model.eval()
            checkpoint(step)
    bar.close()
    model.eval()
    run.seconds = time.perf_counter() - start
    return run


# ----------------------------------------------------------------------------- evaluation
# Greedy answers and likelihoods of all splits go through the model together (fewer, fuller
# batches: on a CPU a decoding step costs about the same for 4 questions as for 32).


def greedy_tables(model, tokenizer, splits: Mapping, *, max_new_tokens: int = 48, batch_size: int = 32) -> dict:
    """`evaluation.greedy_scores` of several splits with one decoding pass over all their
    questions: {split: table with question, answer, generated, rouge_l_recall, keyword_hit}."""
    from probunlearn.sampling import greedy_answers

    questions = [q for dataset in splits.values() for q in dataset["question"]]
    generated = iter(greedy_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, progress=False))
    return {name: score_answers(dataset, [next(generated) for _ in range(len(dataset))])
            for name, dataset in splits.items()}


def nll_tables(model, tokenizer, splits: Mapping, *, fields: Sequence[str] = ("answer",),
               batch_size: int = 32, real_world: Sequence[str] = ("utility",)) -> dict:
    """Answer NLLs (`metrics.answer_nll`) of several splits in one pass. `fields`: any of
    `answer`, `paraphrased` (not for the `real_world` splits, whose paraphrase is the answer,
    SPEC §4), `perturbed`. Returns {split: {"answer_nll": array, "paraphrased_nll": array,
    "perturbed_nll": [array per question]}}."""
    from probunlearn.metrics import answer_nll

    questions, answers, keys = [], [], []
    for name, dataset in splits.items():
        for i, record in enumerate(dataset):
            items = []
            if "answer" in fields:
                items.append(("answer", record["answer"]))
            if "paraphrased" in fields and name not in real_world:
                items.append(("paraphrased", record["paraphrased_answer"]))
            if "perturbed" in fields:
                items += [("perturbed", a) for a in record["perturbed_answer"]]
            for kind, answer in items:
                questions.append(record["question"])
                answers.append(answer)
                keys.append((name, kind, i))
    nll = answer_nll(model, tokenizer, questions, answers, batch_size=batch_size)
    out = {name: {"perturbed_nll": [[] for _ in range(len(dataset))]} for name, dataset in splits.items()}
    for (name, kind, i), value in zip(keys, nll):
        if kind == "perturbed":
            out[name]["perturbed_nll"][i].append(value)
        else:
            out[name].setdefault(f"{kind}_nll", []).append(value)
    for name, table in out.items():
        for key, values in table.items():
            table[key] = [np.asarray(v) for v in values] if key == "perturbed_nll" else np.asarray(values)
        if "perturbed" not in fields:
            del table["perturbed_nll"]
    return out


def trace_metrics(model, tokenizer, eval_sets: Mapping, *, max_new_tokens: int = 48, batch_size: int = 32,
                  nll: bool = True) -> dict:
    """The numbers tracked during unlearning, per split of `eval_sets` (e.g. forget, retain):
    `<split>_rouge_l_recall` and `<split>_keyword_hit` of greedy answers, and `<split>_nll`
    (mean answer NLL)."""
    row = {}
    for name, table in greedy_tables(model, tokenizer, eval_sets, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size).items():
        row |= split_summary(name, table)
    if nll:
        for name, table in nll_tables(model, tokenizer, eval_sets, batch_size=batch_size).items():
            row[f"{name}_nll"] = float(table["answer_nll"].mean())
    return row


def metric_scorer(tokenizer, eval_sets: Mapping, metric: str, *, max_new_tokens: int = 48,
                  batch_size: int = 32) -> Callable:
    """`score(model) -> float`: one `trace_metrics` number (e.g. the bar metric
    `retain_rouge_l_recall`), computing only the split it needs. Used by `choose_mixing`."""
    split = next((name for name in eval_sets if metric.startswith(f"{name}_")), None)
    if split is None:
        raise ValueError(f"metric {metric!r} names none of the splits {', '.join(eval_sets)}; "
                         f"use e.g. 'retain_rouge_l_recall'")

    def score(model) -> float:
        row = trace_metrics(model, tokenizer, {split: eval_sets[split]}, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, nll=metric.endswith("_nll"))
        if metric not in row:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(row)}")
        return row[metric]

    return score


def forget_truth_ratios(model, tokenizer, forget_set, *, batch_size: int = 32) -> np.ndarray:
    """Truth ratios R of `model` on the forget set (SPEC §4), the input of Forget Quality."""
    from probunlearn.metrics import truth_ratio

    table = nll_tables(model, tokenizer, {"forget": forget_set}, fields=("paraphrased", "perturbed"),
                       batch_size=batch_size)["forget"]
    return truth_ratio(table["paraphrased_nll"], table["perturbed_nll"])


def evaluate_unlearning(model, tokenizer, splits: Mapping, *, retain_truth_ratios, max_new_tokens: int = 48,
                        batch_size: int = 32) -> dict:
    """One row of the comparison table (SPEC §4) for a model, from `splits` with `forget`,
    `retain` and `utility`:

    - greedy `forget_/retain_/utility_rouge_l_recall` and `_keyword_hit`;
    - `utility_accuracy`: the true answer more likely than each wrong one (`evaluation.choice_accuracy`);
    - `forget_truth_ratio` (mean min(R, 1/R)) and `forget_quality`: KS p-value against
      `retain_truth_ratios` (the retain model's truth ratios on the same forget questions,
      `forget_truth_ratios`);
    - `model_utility`: harmonic mean of Prob, ROUGE-L and truth-ratio score on retain and on the
      utility set (our real-world set: normalised Prob, the true answer as paraphrase), plus the
      six components as `mu_<split>_<metric>`.

    Every question of each split is answered greedily and scored on 5 (4 on utility) answers:
    cap the splits (`evaluation.cap`) to fit a CPU budget.
    """
    from probunlearn.metrics import forget_quality, model_utility, split_scores, truth_ratio, truth_ratio_score

    splits = {name: splits[name] for name in ("forget", "retain", "utility")}
    row = {}
    data = nll_tables(model, tokenizer, splits, fields=("answer", "paraphrased", "perturbed"), batch_size=batch_size)
    for name, table in greedy_tables(model, tokenizer, splits, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size).items():
        row |= split_summary(name, table)
        data[name]["rouge_l"] = table["rouge_l_recall"].to_numpy()
    utility = data["utility"]
    row["utility_accuracy"] = float(np.mean([true < wrong.min() for true, wrong
                                             in zip(utility["answer_nll"], utility["perturbed_nll"])]))
    ratios = truth_ratio(data["forget"]["paraphrased_nll"], data["forget"]["perturbed_nll"])
    if len(ratios) != len(retain_truth_ratios):
        raise ValueError(f"{len(ratios)} forget questions evaluated but {len(retain_truth_ratios)} retain-model "
                         "truth ratios: compute them with forget_truth_ratios on the same (capped) forget set")
    row["forget_truth_ratio"] = truth_ratio_score(ratios, "forget")
    row["forget_quality"] = forget_quality(ratios, retain_truth_ratios)
    row["forget_nll"] = float(np.mean(data["forget"]["answer_nll"]))
    row["retain_nll"] = float(np.mean(data["retain"]["answer_nll"]))
    components = {f"mu_retain_{k}": v for k, v in split_scores("retain", data["retain"]).items()}
    # our utility set plays TOFU's real-world role (world facts): normalised Prob, answer as paraphrase
    components |= {f"mu_utility_{k}": v for k, v in split_scores("world_facts", utility).items()}
    row["model_utility"] = model_utility(components)
    return {**row, **components}


# ----------------------------------------------------------------------------- control (SPEC §3)
def utility_bar(target_score: float, rho: float = 0.9) -> float:
    """[P2]'s utility bar: ρ·(retain score of π_ref, the target). ρ = 0.9."""
    if not 0 < rho <= 1:
        raise ValueError(f"rho is a fraction of the target's score in (0, 1], got {rho}")
    return rho * float(target_score)


def early_stopping(trace: Sequence[Mapping], bar: float, *, bar_metric: str = "retain_rouge_l_recall",
                   forget_metric: str = "forget_rouge_l_recall") -> dict:
    """[P2] early stopping: among the evaluated checkpoints whose `bar_metric` ≥ `bar`, the one with
    the most forgetting (lowest `forget_metric`; ties: higher `forget_nll` if traced, then the
    earlier step). Returns {'step', 'bar', bar_metric, forget_metric, 'met'}; when no checkpoint
    meets the bar (step 0 always does if the bar is ρ·its own score) it returns the checkpoint with
    the best `bar_metric` and met=False."""
    if not trace:
        raise ValueError("early_stopping got an empty trace: pass evaluate= to unlearn")
    for row in trace:
        for key in (bar_metric, forget_metric):
            if key not in row:
                raise KeyError(f"trace row of step {row.get('step')} has no {key!r}; it has {sorted(row)}")
    meeting = [row for row in trace if row[bar_metric] >= bar]
    if meeting:
        best = min(meeting, key=lambda r: (r[forget_metric], -r.get("forget_nll", 0.0), r["step"]))
    else:
        best = max(trace, key=lambda r: (r[bar_metric], -r["step"]))
    return {"step": int(best["step"]), "bar": float(bar), bar_metric: float(best[bar_metric]),
            forget_metric: float(best[forget_metric]), "met": bool(meeting)}


def _lora_b_parameters(model):
    names = [(n, p) for n, p in model.named_parameters() if "lora_B" in n or "lora_embedding_B" in n]
    if not names:
        raise TypeError("the model has no LoRA adapter to mix: it must be a peft LoRA model")
    return names


@contextlib.contextmanager
def mixed_model(model, lam: float):
    """[P2] model mixing θ(λ) = θ_u + λ·(θ_ref − θ_u), inside a `with` block.

    With a LoRA update θ_u = θ_ref + B·A, this is the adapter scaled by (1 − λ): the lora_B
    matrices are multiplied by (1 − λ) and restored afterwards. λ = 0: the unlearned model;
    λ = 1: the target exactly (the adapter adds zeros). A save inside the block saves θ(λ)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"the mixing weight λ must be in [0, 1], got {lam}")
    saved = {}
    with torch.no_grad():
        for name, param in _lora_b_parameters(model):
            saved[name] = param.detach().clone()
            param.mul_(1.0 - lam)
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, param in _lora_b_parameters(model):
                param.copy_(saved[name])


def bisect_mixing(score_at: Callable[[float], float], bar: float, *, tolerance: float = 0.05,
                  score_at_zero: float | None = None, score_at_one: float | None = None) -> dict:
    """Smallest λ ∈ [0, 1] with `score_at(λ)` ≥ `bar`, by bisection (SPEC §3), assuming the score
    grows with λ (more of the target). Returns λ within `tolerance` above the boundary, always a λ
    that was seen to meet the bar (λ = 0 if the unlearned model already does; 1 if only the target
    does). `score_at_zero` / `score_at_one`: known scores of the endpoints, to save evaluations.
    Returns {'lambda', 'score', 'bar', 'met', 'evaluations': [(λ, score), ...] (known endpoints
    included), 'probes': how many times `score_at` ran}."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
    evaluations, probes = [], []

    def score(lam, known=None):
        if known is None:
            probes.append(lam)
        value = float(score_at(lam) if known is None else known)
        evaluations.append((lam, value))
        return value

    def result(lam, value):
        return {"lambda": lam, "score": value, "bar": float(bar), "met": value >= bar, "evaluations": evaluations,
                "probes": len(probes)}

    zero = score(0.0, score_at_zero)
    if zero >= bar:
        return result(0.0, zero)
    one = score(1.0, score_at_one)
    if one < bar:  # not even the target meets the bar: nothing to bisect
        return result(1.0, one)
    lo, hi, hi_score = 0.0, 1.0, one
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        value = score(mid)
        if value >= bar:
            hi, hi_score = mid, value
        else:
            lo = mid
    return result(hi, hi_score)


def choose_mixing(model, score: Callable, bar: float, *, tolerance: float = 0.05,
                  score_at_zero: float | None = None, score_at_one: float | None = None) -> dict:
    """`bisect_mixing` on a peft model: `score(model) -> float` (the bar metric, e.g. retain
    ROUGE-L recall of greedy answers) is evaluated inside `mixed_model(model, λ)`."""
    def score_at(lam):
        with mixed_model(model, lam):
            return score(model)

    return bisect_mixing(score_at, bar, tolerance=tolerance, score_at_zero=score_at_zero,
                         score_at_one=score_at_one)


CONTROLS = ("early stopped", "mixed")


def unlearn_with_control(model, tokenizer, forget_set, retain_set, *, method: str, eval_sets: Mapping,
                         bar: float, control: str = "mixed", bar_metric: str = "retain_rouge_l_recall",
                         initial_evaluation: dict | None = None, mix_tolerance: float = 0.125,
                         eval_max_new_tokens: int = 48, eval_batch_size: int = 32, **unlearn_kwargs) -> dict:
    """One method, unlearned then controlled (SPEC §3), as notebook 04 runs it: `unlearn` with
    greedy `trace_metrics` on `eval_sets` every `eval_every` steps, then `control` = "early
    stopped" (`early_stopping` on the trace) or "mixed" (`choose_mixing` on the last adapter).
    `unlearn_kwargs` go to `unlearn` (steps, learning_rate, batch_size, hparams, regularisers, ...);
    `eval_max_new_tokens` / `eval_batch_size` are those of the greedy evaluations.
    The model's adapter is left at the chosen checkpoint, *unscaled*: use it inside
    `mixed_model(model, result['lambda'])`. Returns {'run', 'choice' (what the control reported),
    'step', 'lambda', 'state' (the chosen checkpoint)}."""
    if control not in CONTROLS:
        raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
    evaluation = dict(max_new_tokens=eval_max_new_tokens, batch_size=eval_batch_size)
    run = unlearn(model, tokenizer, forget_set, retain_set, method=method, initial_evaluation=initial_evaluation,
                  evaluate=lambda m: trace_metrics(m, tokenizer, eval_sets, **evaluation), **unlearn_kwargs)
    last = run.trace[-1]["step"]
    if control == "early stopped":
        choice = early_stopping(run.trace, bar, bar_metric=bar_metric)
        step, lam = choice["step"], 0.0
    else:
        load_adapter_state(model, run.checkpoints[last])
        score = metric_scorer(tokenizer, eval_sets, bar_metric, **evaluation)
        start = initial_evaluation or run.trace[0]
        choice = choose_mixing(model, score, bar, tolerance=mix_tolerance, score_at_zero=run.trace[-1][bar_metric],
                               score_at_one=start[bar_metric])
        step, lam = last, choice["lambda"]
    load_adapter_state(model, run.checkpoints[step])
    return {"run": run, "choice": choice, "step": step, "lambda": lam, "state": run.checkpoints[step]}
