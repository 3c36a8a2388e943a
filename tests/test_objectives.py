"""The unlearning objectives of SPEC §2 (GA, GA + KL, GD, GA + mismatch, NPO) and [P1]'s entropy regulariser,
on the tiny model of tests/tiny_lm.py."""

import math

import numpy as np
import pytest
import torch

from probunlearn.answers import pack_answer_logits
from probunlearn.models import encode_qa, reference_model
from probunlearn.objectives import (METHODS, StepOutputs, answer_entropy, entropy_regulariser, npo_loss,
                                    sequence_logprob, token_entropy)
from probunlearn.unlearning import unlearn
from tiny_unlearning import FORGET, RETAIN, forget_nll, fresh, logits_of, perturb_adapter


def step_outputs(model, tokenizer, forget=FORGET, retain=RETAIN):
    collate = lambda rs: encode_qa(tokenizer, [r["question"] for r in rs], [r["answer"] for r in rs])
    return StepOutputs(model, {"forget": collate(forget), "retain": collate(retain)})


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
        grad = _gradient(model, METHODS["npo"](out, beta=beta, retain_weight=0.0)["forget"])
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
