"""Unlearning objectives (SPEC §2) and [P1]'s entropy regulariser: what one unlearning step
minimises. The loop that takes the steps is `unlearning.unlearn`; the control of excessive
unlearning is `control`.

Papers: [P3] Yao, Xu, Liu, *Large Language Model Unlearning* (GA, GA + random mismatch + KL on
normal data); TOFU, Maini et al. 2024 (GA, grad diff, KL); Zhang et al. 2024, *Negative Preference
Optimization* (NPO, used by [P1] Scholten et al.); [P2] Wang et al., *Unlearning with Control* (GA
on temperature-scaled logits); [P1] Scholten et al., ICLR 2025 (entropy optimisation).

An objective is a small function `objective(out, **hyper_parameters) -> {term name: loss tensor}`
of a `StepOutputs` (the batches of one step and the model's outputs on them, computed on demand and
cached). The loop minimises the sum of the terms. Extra terms (the entropy regulariser) plug into
any objective through `unlearn(..., regularisers=[fn])`, where `fn(out)` returns more named terms;
because `out` caches the model's outputs, a regulariser on the forget or retain batch costs no extra
forward pass. π_ref (NPO, KL) is the same weights with the adapter disabled
(`models.reference_model`), with no second copy of the model; only full fine-tuning, which has no
adapter to switch off, keeps a frozen copy of the target (`models.attach_reference`).

Token-level quantities work on `answers.AnswerLogits`: the logits of the positions that predict an
answer token, packed, so the output head runs on those positions only (`answers.answer_logits`).

Every objective here averages through `StepOutputs.mean(values, batch, unit)`: a sum divided by the
count of that unit (answer tokens, rows or positions) in the *whole* batch of the step. A step can
then run in parts of rows (`unlearn(..., micro_batch_size=k)`, where one batch does not fit a GPU's
memory), each part's terms adding up to the whole step's, and its gradients too. An objective or
regulariser that averages by itself is exact only in whole batches: register it without
`parts=True` and `unlearn` refuses to run it in parts.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from probunlearn.answers import AnswerLogits, FrozenTrunk, answer_logits, answer_positions, pack_answer_logits
from probunlearn.models import reference_model

__all__ = ["token_nlls", "token_nll", "sequence_logprob", "token_kl", "kl_to_reference", "npo_terms", "npo_loss", "token_entropy",
           "answer_entropy", "StepOutputs", "UNITS", "step_counts", "METHODS", "register", "entropy_regulariser",
           "method_objective", "method_defaults", "ENTROPY_POSITIONS"]

# ----------------------------------------------------------------------------- token-level pieces


def token_nlls(answer: AnswerLogits, temperature: float = 1.0) -> torch.Tensor:
    """NLL of each answer token; `temperature` divides the logits first (T = 1: the plain NLL, and
    no copy of the logits; `ga_temp` uses T != 1)."""
    logits = answer.logits if temperature == 1.0 else answer.logits / temperature
    return F.cross_entropy(logits, answer.targets, reduction="none")


def token_nll(answer: AnswerLogits, temperature: float = 1.0) -> torch.Tensor:
    """NLL of the answer tokens, token mean over the whole batch (SPEC §2 convention; the same
    number as a Hugging Face model's `.loss`): the mean of `token_nlls`."""
    return token_nlls(answer, temperature).mean()


def sequence_logprob(answer: AnswerLogits) -> torch.Tensor:
    """log π(y | x) per sequence: the sum over answer tokens of the token log-probabilities (NPO)."""
    token_logp = -F.cross_entropy(answer.logits, answer.targets, reduction="none")
    return torch.zeros(answer.num_rows, dtype=token_logp.dtype, device=token_logp.device).index_add(
        0, answer.rows, token_logp)


def token_kl(reference: AnswerLogits, current: AnswerLogits) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) of the next-token distributions at each answer-token position."""
    return F.kl_div(F.log_softmax(current.logits, -1), F.log_softmax(reference.logits, -1), log_target=True,
                    reduction="none").sum(-1)


def kl_to_reference(reference: AnswerLogits, current: AnswerLogits) -> torch.Tensor:
    """KL(π_ref ‖ π_θ) of the next-token distributions, mean over answer-token positions
    (SPEC §2: per answer token; TOFU's and [P3]'s code average over every position instead)."""
    return token_kl(reference, current).mean()


def npo_terms(logprob: torch.Tensor, reference_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO's loss per sequence, −(2/β)·log σ(−β·(log π_θ(y|x) − log π_ref(y|x))); `npo_loss` is its mean."""
    if beta <= 0:
        raise ValueError(f"NPO needs beta > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - reference_logprob))


def npo_loss(logprob: torch.Tensor, reference_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (Zhang et al. 2024, eq. 3): −(2/β)·mean log σ(−β·(log π_θ(y|x) − log π_ref(y|x))).

    With log-ratio d, ∂loss/∂d_i = (2/B)·σ(β·d_i): at d = 0, or as β → 0, this is 1/B, the
    gradient of plain gradient ascent on the summed sequence NLL; for d ≪ 0 (already forgotten)
    the weight vanishes, which is what keeps NPO from diverging like GA."""
    return npo_terms(logprob, reference_logprob, beta).mean()


ENTROPY_POSITIONS = ("answer", "all")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Next-token entropy −Σ_v p_v log p_v of softmax(logits) along the last axis, in float32."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def answer_entropy(logits: torch.Tensor, labels: torch.Tensor, positions: str = "answer") -> torch.Tensor:
    """H̄ of [P1]'s entropy optimisation (SPEC §2) from the full (rows x positions x vocabulary)
    logits of a batch:

    - `positions="answer"` (ours, the default): the mean over the positions that predict an answer
      token (answer tokens and EOS) of the next-token entropy;
    - `positions="all"` ([P1]'s released code, `unlearning_trainer.py::entropy_loss`): the plain mean
      over every (row, position) of the logits tensor, prompt, answer, EOS and padding alike. The
      answer positions then get the weight (answer tokens) / (rows x width) of the mean: with our
      batches padded to their longest row, ~40 % on generated author QA; [P1] pads every batch to
      256 tokens (`encode_qa(..., pad_to=256)`), where TOFU answers get ~15 %."""
    if positions not in ENTROPY_POSITIONS:
        raise ValueError(f"positions must be one of {ENTROPY_POSITIONS}, got {positions!r}")
    if positions == "all":
        return token_entropy(logits).mean()
    return token_entropy(pack_answer_logits(logits, labels).logits).mean()


# ----------------------------------------------------------------------------- one step's outputs
class StepOutputs:
    """The batches of one unlearning step and the model's outputs on them, computed on first use
    and cached: `answer(name)` (the `AnswerLogits`, through the adapter, with gradients),
    `reference_answer(name)` (under `reference_model`: adapter disabled, no gradients), and the full
    logits `logits(name)` / `reference_logits(name)`. Batches named in `full_logits` are run once
    with the head on every position (their answer logits are cut from it); the others with the head
    on answer positions only. Batch names: `forget`, `retain`, and `mismatch` (forget questions with
    random answers of other authors) for `ga_mismatch`. `trunk`: a `answers.FrozenTrunk` of the
    model, so the frozen blocks below the adapter run once per sequence over the whole run.

    `counts`: {batch name: {unit: count}} of the whole step when these batches are one part of it
    (`step_counts` of the whole batches; `unlearn` in micro-batches); `mean` then divides by them.
    None: these batches are the whole step."""

    def __init__(self, model, batches: Mapping[str, dict], full_logits: Sequence[str] = (),
                 trunk: FrozenTrunk | None = None, counts: Mapping[str, Mapping[str, int]] | None = None):
        self.model = model
        self.batches = dict(batches)
        self.full_logits = set(full_logits)
        self.trunk = trunk
        self.counts = counts  # None: counted from these batches when `mean` first needs them
        self._cache: dict[tuple[str, str], object] = {}

    def mean(self, values: torch.Tensor, name: str, unit: str) -> torch.Tensor:
        """The step's mean of `values` (one per `unit` of batch `name` in these batches): their sum
        over the count of that unit in the whole step (`UNITS`). In a whole step that is
        `values.mean()`; in a part, the part's share of it."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        if self.counts is None:
            self.counts = step_counts(self.batches)
        return values.sum() / self.counts[name][unit]

    def _batch(self, name: str) -> dict:
        if name not in self.batches:
            raise KeyError(f"this step has no {name!r} batch (it has {', '.join(self.batches)})")
        return self.batches[name]

    def labels(self, name: str) -> torch.Tensor:
        return self._batch(name)["labels"]

    def _cached(self, kind: str, name: str, compute: Callable):
        if (kind, name) not in self._cache:
            self._cache[kind, name] = compute()
        return self._cache[kind, name]

    def _full(self, name: str, model=None) -> torch.Tensor:
        batch = self._batch(name)
        if model is None or model is self.model:
            if self.trunk is not None:
                return self.trunk.logits(batch)
            model = self.model
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def logits(self, name: str) -> torch.Tensor:
        return self._cached("logits", name, lambda: self._full(name))

    def reference_logits(self, name: str) -> torch.Tensor:
        def compute():
            with torch.no_grad(), reference_model(self.model) as reference:
                return self._full(name, reference)
        return self._cached("reference_logits", name, compute)

    def answer(self, name: str) -> AnswerLogits:
        if name in self.full_logits or ("logits", name) in self._cache:
            return self._cached("answer", name, lambda: pack_answer_logits(self.logits(name), self.labels(name)))
        return self._cached("answer", name, lambda: answer_logits(self.model, self._batch(name), self.trunk))

    def reference_answer(self, name: str) -> AnswerLogits:
        def compute():
            with torch.no_grad(), reference_model(self.model) as reference:
                trunk = self.trunk if reference is self.model else None  # a separate copy: its own plain pass
                return answer_logits(reference, self._batch(name), trunk)
        return self._cached("reference_answer", name, compute)

    def nll(self, name: str, temperature: float = 1.0) -> torch.Tensor:
        """`token_nll` of batch `name`: the token mean over the step's answer tokens."""
        return self.mean(token_nlls(self.answer(name), temperature), name, "tokens")


UNITS = ("tokens", "rows", "positions")  # answer tokens (the positions that predict one), rows, every (row, position)


def step_counts(batches: Mapping[str, dict]) -> dict[str, dict[str, int]]:
    """{batch name: {unit: count}} of collated batches (`UNITS`): what `StepOutputs.mean` divides by."""
    return {name: {"tokens": int(answer_positions(b["labels"]).sum()), "rows": int(b["input_ids"].shape[0]),
                   "positions": int(b["input_ids"].numel())} for name, b in batches.items()}


# ----------------------------------------------------------------------------- objectives (SPEC §2)
METHODS: dict[str, Callable] = {}


def register(name: str, uses: Sequence[str] = ("forget",), parts: bool = False):
    """Add an objective to `METHODS`; `uses` names the batches it reads (the loop builds those).
    `parts=True`: it averages only through `StepOutputs.mean`, so it may run in micro-batches."""
    def wrap(fn):
        fn.method_name, fn.uses, fn.parts = name, tuple(uses), parts
        METHODS[name] = fn
        return fn
    return wrap


@register("ga", parts=True)
def ga(out: StepOutputs) -> dict:
    """Gradient ascent ([P3], TOFU): minimise −NLL_θ(D_f)."""
    return {"forget": -out.nll("forget")}


@register("gd", uses=("forget", "retain"), parts=True)
def gd(out: StepOutputs, retain_weight: float = 1.0) -> dict:
    """Gradient difference (TOFU): −NLL_θ(D_f) + α·NLL_θ(D_r)."""
    return {"forget": -out.nll("forget"), "retain": retain_weight * out.nll("retain")}


@register("ga_kl", uses=("forget", "retain"), parts=True)
def ga_kl(out: StepOutputs, retain_weight: float = 1.0) -> dict:
    """GA with a KL term on retain data (TOFU, [P3]): −NLL_θ(D_f) + α·KL(π_ref ‖ π_θ) on D_r,
    per answer token. Zero KL before the first step (the fresh adapter is the identity)."""
    kl = out.mean(token_kl(out.reference_answer("retain"), out.answer("retain")), "retain", "tokens")
    return {"forget": -out.nll("forget"), "kl": retain_weight * kl}


@register("ga_mismatch", uses=("forget", "retain", "mismatch"), parts=True)
def ga_mismatch(out: StepOutputs, forget_weight: float = 0.5, mismatch_weight: float = 1.0,
                normal_weight: float = 1.0) -> dict:
    """[P3] Yao et al.: w_f·(−NLL_θ(D_f)) + w_m·NLL_θ(y_rand | x_f) + w_n·KL(π_ref ‖ π_θ) on
    normal data. y_rand: answers of other authors' retain questions (`unlearning.mismatch_pairs`),
    several per forget prompt; the normal data are our retain questions. Defaults w = (0.5, 1, 1)."""
    kl = out.mean(token_kl(out.reference_answer("retain"), out.answer("retain")), "retain", "tokens")
    return {"forget": -forget_weight * out.nll("forget"),
            "mismatch": mismatch_weight * out.nll("mismatch"),
            "kl": normal_weight * kl}


@register("npo", uses=("forget", "retain"), parts=True)
def npo(out: StepOutputs, beta: float = 0.1, retain_weight: float = 1.0) -> dict:
    """NPO (Zhang et al. 2024, as used by [P1]): `npo_loss` on sequence log-probs summed over
    answer tokens, π_ref = the adapter disabled, plus α·NLL_θ(D_r). β = 0.1 (SPEC §2; [P1]'s
    configs use 0.05)."""
    logprob = sequence_logprob(out.answer("forget"))
    reference = sequence_logprob(out.reference_answer("forget"))
    return {"forget": out.mean(npo_terms(logprob, reference, beta), "forget", "rows"),
            "retain": retain_weight * out.nll("retain")}


@register("ga_temp", parts=True)
def ga_temp(out: StepOutputs, temperature: float = 2.0) -> dict:
    """[P2] Wang et al.: gradient ascent on temperature-scaled logits, −CE(softmax(z/T), y) on D_f.
    T = 2 is the fallback value in the authors' code (`dataloader.py`, loss `ga_temp`)."""
    return {"forget": -out.nll("forget", temperature=temperature)}


@register("none", parts=True)
def none(out: StepOutputs) -> dict:
    """No unlearning term: only the run's `regularisers` act (notebook 04's "entropy only" arm of the
    two-phase run: the entropy term alone from a model that greedy already calls forgotten).
    `unlearn` refuses it without a regulariser, which would leave nothing to minimise."""
    return {}


def entropy_regulariser(forget_weight: float = 1.0, retain_weight: float = -0.25, positions: str = "answer") -> Callable:
    """[P1] entropy optimisation as a regulariser for any objective (`unlearn(..., regularisers=
    [entropy_regulariser()])`): adds λ_f·H̄_θ(D_f) + λ_r·H̄_θ(D_r) (`answer_entropy`). Defaults
    λ_f = 1 (entropy pushed down on forget questions, so sampling there behaves like greedy
    decoding) and λ_r = −0.25 (kept up on retain questions, so their diversity survives), as in
    [P1]'s configs. `positions`: "answer" (ours, the default) or "all" ([P1]'s code: every position
    of the padded batch; see `answer_entropy` for the weight the answers then get). Reuses the
    step's cached outputs: no extra forward pass (with "all", the step runs the head on every
    position of the forget and retain batches)."""
    if positions not in ENTROPY_POSITIONS:
        raise ValueError(f"positions must be one of {ENTROPY_POSITIONS}, got {positions!r}")

    def mean_entropy(out: StepOutputs, name: str) -> torch.Tensor:
        if positions == "all":
            return out.mean(token_entropy(out.logits(name)), name, "positions")
        return out.mean(token_entropy(out.answer(name).logits), name, "tokens")

    def regulariser(out: StepOutputs) -> dict:
        terms = {}
        if forget_weight:
            terms["entropy_forget"] = forget_weight * mean_entropy(out, "forget")
        if retain_weight:
            terms["entropy_retain"] = retain_weight * mean_entropy(out, "retain")
        return terms

    regulariser.hparams = {"entropy_forget_weight": forget_weight, "entropy_retain_weight": retain_weight,
                           "entropy_positions": positions}
    regulariser.uses = ("forget", "retain") if retain_weight else ("forget",)
    regulariser.full_logits = regulariser.uses if positions == "all" else ()
    regulariser.parts = True  # averages through StepOutputs.mean
    return regulariser


def method_objective(method: str) -> Callable:
    """The objective registered under `method`, or a ValueError listing the valid names."""
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[method]


def method_defaults(method: str) -> dict:
    """The hyper-parameters of a method and their defaults, e.g. {'beta': 0.1, 'retain_weight': 1.0}."""
    signature = inspect.signature(method_objective(method))
    return {n: p.default for n, p in list(signature.parameters.items())[1:]}


RENAMED_HPARAMS = {"alpha": "retain_weight"}  # old name -> SPEC's (SPEC §2's α), accepted for one release


def check_hparams(method: str, hparams: Mapping) -> dict:
    """`hparams` completed with the method's defaults; a ValueError names unknown ones. An old name
    (`RENAMED_HPARAMS`) is passed on under its new one, with a DeprecationWarning."""
    hparams = dict(hparams)
    for old, new in RENAMED_HPARAMS.items():
        if old in hparams and old not in method_defaults(method):
            if new in hparams:
                raise ValueError(f"{method} got the hyper-parameter {old!r} and its new name {new!r}: pass {new!r} only")
            warnings.warn(f"the hyper-parameter {old!r} is now {new!r}", DeprecationWarning, stacklevel=2)
            hparams[new] = hparams.pop(old)
    valid = method_defaults(method)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ValueError(f"{method} takes the hyper-parameters {sorted(valid) or 'none'}; "
                         f"got unknown {unknown}")
    return {**valid, **hparams}
