"""Unlearning objectives (probunlearn.objectives), the loop's guard rails (probunlearn.unlearning) and
the two controls of excessive unlearning (probunlearn.control), on the tiny random Llama and
character tokenizer of tests/tiny_lm.py."""

import copy
import math
import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny_lm import tiny_model, tiny_tokenizer

from probunlearn.control import bisect_mixing, early_stopping, mixed_model, unlearn_with_control, utility_bar
from probunlearn.metrics import answer_nll
from probunlearn.models import (add_lora, answer_logits, answer_loss, encode_qa, load_model, pack_answer_logits,
                                reference_model, save_adapter)
from probunlearn.objectives import (METHODS, StepOutputs, answer_entropy, entropy_regulariser, npo_loss,
                                    sequence_logprob, token_entropy)
from probunlearn.unlearning import (
    adapter_state,
    checkpoint_restored,
    evaluate_unlearning,
    forget_truth_ratios,
    mismatch_pairs,
    nll_tables,
    reset_adapter,
    start_unlearning,
    unlearn,
)


TITLES = ["Salt", "Iron", "Glass", "Amber"]


def _record(author, title):
    return {"question": f"What did {author} write?", "answer": f"{author} wrote {title}.",
            "paraphrased_answer": f"{title} was written by {author}.",
            "perturbed_answer": [f"{author} painted {title}.", f"{author} sang {title}.", f"{author} sold {title}."],
            "author": author, "keywords": [title]}


FORGET = [_record("Ana", t) for t in TITLES]
RETAIN = [_record(a, t) for a in ("Bo", "Cy") for t in TITLES]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama ("the target"), in memory and saved like a model directory."""
    tokenizer, model = tiny_tokenizer(), tiny_model()
    path = tmp_path_factory.mktemp("tiny_target")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"model": model, "tokenizer": tokenizer, "path": path}


def fresh(tiny, seed=0):
    """A copy of the tiny target with a fresh LoRA adapter (what `start_unlearning` gives)."""
    torch.manual_seed(seed)
    return add_lora(copy.deepcopy(tiny["model"]), r=4, lora_alpha=8), tiny["tokenizer"]


def logits_of(model, tokenizer, records=FORGET):
    batch = encode_qa(tokenizer, [r["question"] for r in records], [r["answer"] for r in records])
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def step_outputs(model, tokenizer, forget=FORGET, retain=RETAIN):
    collate = lambda rs: encode_qa(tokenizer, [r["question"] for r in rs], [r["answer"] for r in rs])
    return StepOutputs(model, {"forget": collate(forget), "retain": collate(retain)})


def perturb_adapter(model, std=0.3, seed=1):
    """Stand-in for an unlearning run: random lora_B (a fresh adapter has lora_B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def forget_nll(model, tokenizer):
    return answer_nll(model, tokenizer, [r["question"] for r in FORGET], [r["answer"] for r in FORGET]).mean()


# ----------------------------------------------------------------------------- objectives
def test_registry_has_the_spec_methods():
    assert {"ga", "gd", "ga_kl", "ga_mismatch", "npo", "ga_temp"} <= set(METHODS)


def test_one_ga_step_raises_the_forget_nll(tiny):
    model, tokenizer = fresh(tiny)
    before = forget_nll(model, tokenizer)
    with torch.no_grad():
        batch_nll = step_outputs(model, tokenizer).nll("forget").item()
    run = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=1, learning_rate=1e-3, batch_size=4,
                  progress=False)
    assert forget_nll(model, tokenizer) > before
    assert run.log[0]["loss"] == pytest.approx(-batch_nll, rel=1e-4)  # GA's loss is −NLL (token mean)


@pytest.mark.parametrize("method", ["ga", "gd", "ga_kl", "ga_mismatch", "npo", "ga_temp"])
def test_every_method_runs_and_logs_its_terms(tiny, method):
    model, tokenizer = fresh(tiny)
    run = unlearn(model, tokenizer, FORGET, RETAIN, method=method, steps=2, learning_rate=1e-3, batch_size=2,
                  progress=False)
    assert [r["step"] for r in run.log] == [1, 2]
    terms = {k for k in run.log[0] if k not in ("step", "loss", "seconds")}
    assert "forget" in terms
    for row in run.log:
        assert math.isfinite(row["loss"]) and row["loss"] == pytest.approx(sum(row[t] for t in terms), rel=1e-5)


def test_npo_matches_its_closed_form():
    logprob = torch.tensor([-3.0, -1.0, -7.5])
    reference = torch.tensor([-2.0, -2.0, -2.5])
    beta = 0.5
    d = (logprob - reference).numpy()
    expected = -(2 / beta) * np.mean(np.log(1 / (1 + np.exp(beta * d))))  # log σ(−βd)
    assert npo_loss(logprob, reference, beta).item() == pytest.approx(expected, rel=1e-6)
    # at θ = θ_ref every sequence has log-ratio 0: the loss is (2/β)·log 2
    assert npo_loss(reference, reference, beta).item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        npo_loss(logprob, reference, 0.0)


def _gradient(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def test_npo_tends_to_the_ga_direction_as_beta_goes_to_zero(tiny):
    model, tokenizer = fresh(tiny)
    perturb_adapter(model)  # away from π_ref, so the log-ratios differ between sequences
    # GA on the summed sequence NLL: minimise mean_i log π_θ(y_i | x_i)
    ga_grad = _gradient(model, sequence_logprob(pack_answer_logits(*_forget_logits(model, tokenizer))).mean())

    def cosine(beta):
        out = step_outputs(model, tokenizer)
        grad = _gradient(model, METHODS["npo"](out, beta=beta, alpha=0.0)["forget"])
        return torch.nn.functional.cosine_similarity(grad, ga_grad, dim=0).item()

    small, large = cosine(1e-4), cosine(5.0)
    assert small > 0.99999
    assert large < small


def _forget_logits(model, tokenizer):
    batch = encode_qa(tokenizer, [r["question"] for r in FORGET], [r["answer"] for r in FORGET])
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]


def test_ga_kl_has_zero_kl_before_the_first_step(tiny):
    model, tokenizer = fresh(tiny)
    assert METHODS["ga_kl"](step_outputs(model, tokenizer))["kl"].item() == 0.0
    perturb_adapter(model)
    assert METHODS["ga_kl"](step_outputs(model, tokenizer))["kl"].item() > 1e-4


def test_reference_logits_come_from_the_disabled_adapter(tiny):
    model, tokenizer = fresh(tiny)
    perturb_adapter(model)
    out = step_outputs(model, tokenizer)
    with reference_model(model):
        expected = logits_of(model, tokenizer)
    assert torch.equal(out.reference_logits("forget"), expected)
    assert not torch.equal(out.logits("forget"), expected)


def test_answer_logits_run_the_head_on_answer_positions_only_and_match_the_full_forward(tiny):
    model, tokenizer = fresh(tiny)
    perturb_adapter(model)
    batch = encode_qa(tokenizer, [r["question"] for r in FORGET + RETAIN[:2]], [r["answer"] for r in FORGET + RETAIN[:2]])
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    fast, packed = answer_logits(model, batch), pack_answer_logits(full.logits, batch["labels"])
    mask = batch["labels"][:, 1:] != -100
    assert fast.logits.shape == (int(mask.sum()), 64) and fast.num_rows == 6
    assert torch.allclose(fast.logits, packed.logits, atol=1e-5)
    assert torch.equal(fast.targets, packed.targets) and torch.equal(fast.rows, packed.rows)
    assert answer_loss(model, batch).item() == pytest.approx(full.loss.item(), rel=1e-5)
    # the per-sequence sum regroups the tokens of each row
    expected = -torch.nn.functional.cross_entropy(full.logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                  reduction="none").sum(1)
    assert torch.allclose(sequence_logprob(fast), expected, atol=1e-4)


def test_trunk_answer_nll_equals_answer_nll_and_trace_metrics_uses_it(tiny):
    from probunlearn.models import FrozenTrunk
    from probunlearn.unlearning import trace_metrics, trunk_answer_nll

    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(tiny["model"]), r=4, lora_alpha=8, top_layers=1)
    tokenizer = tiny["tokenizer"]
    perturb_adapter(model)
    trunk = FrozenTrunk(model)
    records = FORGET + RETAIN
    questions, answers = [r["question"] for r in records], [r["answer"] for r in records]
    plain = answer_nll(model, tokenizer, questions, answers)
    fast = trunk_answer_nll(model, tokenizer, questions, answers, trunk, batch_size=3)
    np.testing.assert_allclose(fast, plain, rtol=1e-4)
    assert len(set(np.round(plain, 4))) > 1  # the numbers differ between items: the comparison means something
    splits = {"forget": Dataset.from_list(FORGET), "retain": Dataset.from_list(RETAIN)}
    with_trunk = trace_metrics(model, tokenizer, splits, max_new_tokens=4, trunk=trunk)
    without = trace_metrics(model, tokenizer, splits, max_new_tokens=4)
    assert with_trunk["forget_nll"] == pytest.approx(without["forget_nll"], rel=1e-4)
    assert with_trunk["retain_nll"] == pytest.approx(without["retain_nll"], rel=1e-4)


def test_frozen_trunk_runs_only_the_adapted_blocks_and_changes_no_number(tiny):
    """With the adapter on the top block only, the bottom block's output is kept per sequence; logits,
    reference logits and whole unlearning runs are those of plain forward passes."""
    from probunlearn.models import FrozenTrunk

    torch.manual_seed(0)
    model = add_lora(copy.deepcopy(tiny["model"]), r=4, lora_alpha=8, top_layers=1)
    tokenizer = tiny["tokenizer"]
    perturb_adapter(model)
    trunk = FrozenTrunk(model)
    assert trunk.enabled and trunk.first == 1
    assert not FrozenTrunk(fresh(tiny)[0]).enabled  # an adapter on every block: nothing to keep
    batch = encode_qa(tokenizer, [r["question"] for r in FORGET + RETAIN], [r["answer"] for r in FORGET + RETAIN])
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(trunk.logits(batch), plain, atol=1e-5)  # padding positions too
    assert len(trunk._states) == len(FORGET + RETAIN)
    wider = encode_qa(tokenizer, [r["question"] for r in FORGET], [r["answer"] for r in FORGET], pad_to=batch["input_ids"].shape[1] + 5)
    with torch.no_grad():  # a wider batch of rows already kept: their padding positions are computed anew
        assert torch.allclose(trunk.logits(wider), model(input_ids=wider["input_ids"],
                                                          attention_mask=wider["attention_mask"]).logits, atol=1e-5)
    with reference_model(model):
        reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(answer_logits(model, batch, trunk).logits, pack_answer_logits(reference, batch["labels"]).logits,
                              atol=1e-5)
    kept = unlearn(copy.deepcopy(model), tokenizer, FORGET, RETAIN, method="npo", steps=3, learning_rate=1e-2,
                   batch_size=2, progress=False)  # a trunk of its own, enabled
    copy_ = copy.deepcopy(model)
    plain_run = unlearn(copy_, tokenizer, FORGET, RETAIN, method="npo", steps=3, learning_rate=1e-2, batch_size=2,
                        trunk=_DisabledTrunk(copy_), progress=False)
    for a, b in zip(kept.log, plain_run.log):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


class _DisabledTrunk:
    """A trunk that always runs the plain forward pass (the reference the kept states must match)."""

    def __init__(self, model):
        from probunlearn.models import FrozenTrunk

        self._trunk = FrozenTrunk(model)
        self._trunk.enabled = False

    def __getattr__(self, name):
        return getattr(self._trunk, name)


def test_reset_adapter_gives_a_fresh_identity_adapter_per_seed(tiny):
    model, tokenizer = fresh(tiny)
    perturb_adapter(model)
    reset_adapter(model, seed=3)
    first = adapter_state(model)
    assert all((v == 0).all() for k, v in first.items() if "lora_B" in k)  # adds nothing: the target again
    reset_adapter(model, seed=3)
    assert all(torch.equal(first[k], v) for k, v in adapter_state(model).items())
    reset_adapter(model, seed=4)
    assert any(not torch.equal(first[k], v) for k, v in adapter_state(model).items() if "lora_A" in k)


def test_mismatch_answers_come_from_other_authors():
    pool = FORGET + RETAIN  # even with the forget author in the pool, it is never drawn
    owner = {r["answer"]: r["author"] for r in pool}
    questions, answers = mismatch_pairs(FORGET, pool, per_prompt=5, rng=random.Random(0))
    assert len(questions) == len(answers) == 5 * len(FORGET)
    assert all(owner[a] != "Ana" for a in answers)
    assert len(set(answers)) > 1  # random, not one fixed answer
    with pytest.raises(ValueError, match="other than"):
        mismatch_pairs(FORGET, FORGET, per_prompt=1, rng=random.Random(0))


# ----------------------------------------------------------------------------- guard rails
def test_unknown_method_lists_the_valid_ones(tiny):
    model, tokenizer = fresh(tiny)
    with pytest.raises(ValueError, match="valid methods: ga, gd, ga_kl, ga_mismatch, npo, ga_temp"):
        unlearn(model, tokenizer, FORGET, RETAIN, method="gradient_ascent", steps=1, learning_rate=1e-3, batch_size=2)
    with pytest.raises(ValueError, match="beta"):
        unlearn(model, tokenizer, FORGET, RETAIN, method="npo", hparams={"betta": 0.1}, steps=1,
                learning_rate=1e-3, batch_size=2)


def test_nan_guard_names_method_step_and_last_finite_loss(tiny):
    model, tokenizer = fresh(tiny)
    calls = []

    def breaks_at_step_two(out):  # also exercises the extra-term hook of issue 5
        calls.append(1)
        return {"extra": out.nll("retain") * (float("nan") if len(calls) == 2 else 0.0)}

    with pytest.raises(FloatingPointError, match=r"gd: the loss became nan at step 2 \(last finite loss -?\d"):
        unlearn(model, tokenizer, FORGET, RETAIN, method="gd", steps=5, learning_rate=1e-3, batch_size=2,
                regularisers=[breaks_at_step_two], progress=False)


# ----------------------------------------------------------------------------- controls
def test_mixing_endpoints_are_exact(tiny):
    target, tokenizer = load_model(tiny["path"], dtype=torch.float32, device="cpu")
    model, _ = fresh(tiny)
    perturb_adapter(model)
    with model.disable_adapter():  # the target's weights through the same kernels: bit for bit comparable
        target_logits = logits_of(model, tokenizer)
    # the saved target computes the same (its own kernels: equal up to float rounding)
    torch.testing.assert_close(logits_of(target, tokenizer), target_logits)
    unlearned = logits_of(model, tokenizer)
    assert not torch.equal(unlearned, target_logits)
    with mixed_model(model, 0.0):
        assert torch.equal(logits_of(model, tokenizer), unlearned)
    with mixed_model(model, 1.0):
        assert torch.equal(logits_of(model, tokenizer), target_logits)
    with mixed_model(model, 0.5):
        assert not torch.equal(logits_of(model, tokenizer), unlearned)
    assert torch.equal(logits_of(model, tokenizer), unlearned)  # restored after the block
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        with mixed_model(model, 1.5):
            pass


def test_a_mixed_adapter_saved_in_the_block_loads_as_the_mixed_model(tiny, tmp_path):
    model, tokenizer = start_unlearning(tiny["path"], lora_r=4, dtype=torch.float32, device="cpu")
    perturb_adapter(model)
    with mixed_model(model, 0.25):
        expected = logits_of(model, tokenizer)
        save_adapter(model, tmp_path / "mix", base=tiny["path"], extra={"lambda": 0.25})
    loaded, _ = load_model(tmp_path / "mix", dtype=torch.float32, device="cpu")
    assert torch.allclose(logits_of(loaded, tokenizer), expected, atol=1e-5)


def test_bisection_returns_the_smallest_lambda_meeting_the_bar():
    step = lambda lam: 0.2 if lam < 0.3 else 0.95  # the bar is met from λ = 0.3 on
    chosen = bisect_mixing(step, 0.9, tolerance=1e-3)
    assert 0.3 <= chosen["lambda"] <= 0.3 + 1e-3 and chosen["met"] and chosen["score"] == 0.95
    smooth = bisect_mixing(lambda lam: lam ** 2, 0.25, tolerance=1 / 64)
    assert 0.5 <= smooth["lambda"] <= 0.5 + 1 / 64
    assert len(smooth["evaluations"]) == 2 + 6 and smooth["probes"] == 8  # endpoints, then log2(64) steps
    known = bisect_mixing(lambda lam: lam ** 2, 0.25, tolerance=1 / 64, score_at_zero=0.0, score_at_one=1.0)
    assert known["probes"] == 6 and known["lambda"] == smooth["lambda"]
    # already meeting the bar: no mixing; known endpoint scores are not re-evaluated
    calls = []
    chosen = bisect_mixing(lambda lam: calls.append(lam) or 1.0, 0.5, score_at_zero=0.6)
    assert chosen["lambda"] == 0.0 and chosen["probes"] == 0 and calls == []
    # not even the target meets the bar
    assert bisect_mixing(lambda lam: 0.1, 0.5)["met"] is False


def test_early_stopping_keeps_the_most_forgetting_checkpoint_above_the_bar():
    retain = [0.80, 0.78, 0.74, 0.73, 0.60, 0.20]
    forget = [0.95, 0.70, 0.40, 0.40, 0.05, 0.00]
    trace = [{"step": 5 * i, "retain_rouge_l_recall": r, "forget_rouge_l_recall": f, "forget_nll": 1.0 + i}
             for i, (r, f) in enumerate(zip(retain, forget))]
    bar = utility_bar(0.80, rho=0.9)  # 0.72
    chosen = early_stopping(trace, bar)
    # steps 0-15 meet the bar; 10 and 15 tie on forget ROUGE-L, 15 has the higher forget NLL
    assert chosen == {"step": 15, "bar": pytest.approx(0.72), "retain_rouge_l_recall": 0.73,
                      "forget_rouge_l_recall": 0.40, "met": True}
    assert early_stopping(trace, 0.9)["step"] == 0 and early_stopping(trace, 0.9)["met"] is False
    chosen = early_stopping(trace, 0.5, bar_metric="retain_rouge_l_recall", forget_metric="forget_nll")
    assert chosen["step"] == 0  # any metric works; lowest forget_nll among those meeting 0.5


def test_checkpoints_restore_the_adapter_of_their_step(tiny):
    model, tokenizer = fresh(tiny)
    evaluate = lambda m: {"forget_nll": float(forget_nll(m, tokenizer))}
    run = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=3, learning_rate=1e-2, batch_size=2,
                  eval_every=2, evaluate=evaluate, progress=False)
    assert [r["step"] for r in run.trace] == [0, 2, 3] and set(run.checkpoints) == {0, 2, 3}
    assert run.trace[-1]["forget_nll"] > run.trace[0]["forget_nll"]
    final = adapter_state(model)
    with checkpoint_restored(model, run.checkpoints[2]):
        assert forget_nll(model, tokenizer) == pytest.approx(run.trace[1]["forget_nll"], rel=1e-6)
    assert all(torch.equal(final[k], v) for k, v in adapter_state(model).items())


def test_evaluate_unlearning_gives_a_table_row(tiny):
    from datasets import Dataset

    model, tokenizer = fresh(tiny)
    splits = {"forget": Dataset.from_list(FORGET), "retain": Dataset.from_list(RETAIN[:3]),
              "utility": Dataset.from_list(RETAIN[3:6])}
    retain_ratios = forget_truth_ratios(model, tokenizer, splits["forget"])
    row = evaluate_unlearning(model, tokenizer, splits, retain_truth_ratios=retain_ratios, max_new_tokens=3)
    for key in ("forget_rouge_l_recall", "forget_keyword_hit", "retain_rouge_l_recall", "utility_accuracy",
                "forget_quality", "model_utility"):
        assert 0.0 <= row[key] <= 1.0
    assert row["forget_quality"] == 1.0  # the same model against itself: identical truth ratios


def test_batched_likelihoods_match_the_per_question_ones(tiny):
    from datasets import Dataset

    from probunlearn.evaluation import choice_accuracy

    model, tokenizer = fresh(tiny)
    splits = {"forget": Dataset.from_list(FORGET[:2]), "utility": Dataset.from_list(RETAIN[:3])}
    tables = nll_tables(model, tokenizer, splits, fields=("answer", "paraphrased", "perturbed"))
    record = RETAIN[2]
    alone = answer_nll(model, tokenizer, [record["question"]] * 4, [record["answer"], *record["perturbed_answer"]])
    assert tables["utility"]["answer_nll"][2] == pytest.approx(alone[0], rel=1e-4)
    assert tables["utility"]["perturbed_nll"][2] == pytest.approx(alone[1:], rel=1e-4)
    assert "paraphrased_nll" not in tables["utility"] and len(tables["forget"]["paraphrased_nll"]) == 2
    retain_ratios = forget_truth_ratios(model, tokenizer, splits["forget"])
    row = evaluate_unlearning(model, tokenizer, {**splits, "retain": splits["utility"]},
                              retain_truth_ratios=retain_ratios, max_new_tokens=2)
    assert row["utility_accuracy"] == choice_accuracy(model, tokenizer, splits["utility"])


# ----------------------------------------------------------------------------- entropy optimisation [P1]
def test_answer_entropy_averages_over_answer_tokens_only(tiny):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    batch = encode_qa(tokenizer, [r["question"] for r in FORGET], [r["answer"] for r in FORGET])
    logits = logits_of(model, tokenizer)
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    per_position = -(logp.exp() * logp).sum(-1)
    mask = batch["labels"][:, 1:] != -100
    expected = per_position[mask].mean()
    assert float(answer_entropy(logits, batch["labels"])) == pytest.approx(float(expected), rel=1e-6)
    # not the average over every position (what [P1]'s reference code computes)
    assert abs(float(per_position.mean()) - float(expected)) > 1e-3
    uniform = torch.zeros(1, 3, 64)
    assert float(answer_entropy(uniform, torch.tensor([[-100, 5, 6]]))) == pytest.approx(math.log(64), rel=1e-6)


def test_entropy_regulariser_adds_its_terms_and_lowers_forget_entropy(tiny):
    model, tokenizer = fresh(tiny)
    batch = encode_qa(tokenizer, [r["question"] for r in FORGET], [r["answer"] for r in FORGET])

    def forget_entropy():
        with torch.no_grad():
            return float(answer_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                        batch["labels"]))

    before = forget_entropy()
    run = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=3, learning_rate=0.05, batch_size=4,
                  regularisers=[entropy_regulariser(forget_weight=10.0, retain_weight=-0.25)], progress=False)
    assert {"forget", "entropy_forget", "entropy_retain"} <= set(run.log[0])
    assert run.log[0]["loss"] == pytest.approx(sum(run.log[0][k] for k in ("forget", "entropy_forget", "entropy_retain")),
                                               rel=1e-5)
    assert run.hparams["entropy_forget_weight"] == 10.0 and run.hparams["entropy_retain_weight"] == -0.25
    assert run.hparams["entropy_positions"] == "answer"
    assert forget_entropy() < before
    # a zero weight drops its term
    assert set(entropy_regulariser(1.0, 0.0)(step_outputs(*fresh(tiny)))) == {"entropy_forget"}


def test_entropy_over_all_positions_is_the_plain_mean_over_the_padded_batch(tiny):
    """positions="all" is [P1]'s `entropy_loss`: the mean over every (row, position) of the logits
    tensor, padding included, so padding the batch to a fixed length changes it."""
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    questions, answers = [r["question"] for r in FORGET[:2]], ["short.", "a much longer answer than that."]
    natural = encode_qa(tokenizer, questions, answers)
    padded = encode_qa(tokenizer, questions, answers, pad_to=natural["input_ids"].shape[1] + 9)
    assert padded["input_ids"].shape[1] == natural["input_ids"].shape[1] + 9
    assert torch.equal(padded["labels"][:, :natural["labels"].shape[1]], natural["labels"])
    assert (padded["attention_mask"][:, natural["labels"].shape[1]:] == 0).all()
    for batch in (natural, padded):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        by_hand = []
        for row in range(logits.shape[0]):
            for position in range(logits.shape[1]):
                p = torch.softmax(logits[row, position].double(), -1)
                by_hand.append(float(-(p * p.log()).sum()))
        assert float(answer_entropy(logits, batch["labels"], positions="all")) == pytest.approx(np.mean(by_hand), rel=1e-5)
        # the answer reading averages over the positions that predict answer tokens only
        mask = batch["labels"][:, 1:] != -100
        assert float(answer_entropy(logits, batch["labels"])) == pytest.approx(
            float(token_entropy(logits[:, :-1])[mask].mean()), rel=1e-6)
    with pytest.raises(ValueError, match="positions"):
        answer_entropy(logits, padded["labels"], positions="prompt")


def test_the_all_positions_regulariser_reads_full_logits_and_trains(tiny):
    model, tokenizer = fresh(tiny)
    regulariser = entropy_regulariser(1.0, -0.25, positions="all")
    assert set(regulariser.full_logits) == {"forget", "retain"}
    out = step_outputs(model, tokenizer)
    terms = regulariser(out)
    assert float(terms["entropy_forget"].detach()) == pytest.approx(
        float(token_entropy(out.logits("forget")).detach().mean()), rel=1e-6)
    assert float(terms["entropy_retain"].detach()) == pytest.approx(
        -0.25 * float(token_entropy(out.logits("retain")).detach().mean()), rel=1e-6)
    run = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=2, learning_rate=0.05, batch_size=2, pad_to=40,
                  regularisers=[regulariser], progress=False)
    assert run.hparams["entropy_positions"] == "all" and all(math.isfinite(r["loss"]) for r in run.log)


@pytest.mark.parametrize("control", ["early stopped", "mixed"])
def test_unlearn_with_control_reports_and_applies_its_choice(tiny, control):
    model, tokenizer = fresh(tiny)
    eval_sets = {"forget": Dataset.from_list(FORGET), "retain": Dataset.from_list(RETAIN)}
    out = unlearn_with_control(model, tokenizer, FORGET, RETAIN, method="ga", eval_sets=eval_sets, bar=0.0,
                               control=control, steps=2, learning_rate=0.05, batch_size=4, eval_every=1,
                               eval_max_new_tokens=4, progress=False)
    assert [row["step"] for row in out["run"].trace] == [0, 1, 2]
    # a bar of 0 is met by every checkpoint: keep the most forgetting one, or mix nothing back in
    if control == "mixed":
        assert out["lambda"] == 0.0 and out["step"] == 2 and out["choice"]["met"]
    else:
        assert out["lambda"] == 0.0 and out["step"] == out["choice"]["step"] and out["choice"]["met"]
    for name, tensor in adapter_state(model).items():
        assert torch.equal(tensor, out["state"][name])
    with pytest.raises(ValueError, match="control"):
        unlearn_with_control(model, tokenizer, FORGET, RETAIN, method="ga", eval_sets=eval_sets, bar=0.0,
                             control="none", steps=1, learning_rate=0.05, batch_size=4)
