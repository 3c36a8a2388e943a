"""The unlearning loop (probunlearn.unlearning): a fresh adapter per seed, random mismatch answers, its
guard rails and its checkpoints, on the tiny random Llama and character tokenizer of tests/tiny_lm.py."""

import random

import pytest
import torch

from probunlearn.unlearning import (adapter_state, checkpoint_restored, full_tuning_dtype, mismatch_pairs, reset_adapter,
                                   start_full_unlearning, start_runs, unlearn)
from tiny_unlearning import FORGET, RETAIN, forget_nll, fresh, perturb_adapter


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


def test_full_fine_tuning_keeps_float32_weights_under_bfloat16_products(tiny):
    model, tokenizer = start_full_unlearning(tiny["path"])
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    before = adapter_state(model)
    assert len(before) == len(list(model.parameters()))  # every weight is trained, and copied
    run = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=2, learning_rate=1e-5, batch_size=2,
                  compute_dtype=torch.bfloat16, progress=False)
    after = adapter_state(model)
    assert len(run.log) == 2 and all(v.dtype == torch.float32 for v in after.values())
    changes = [(after[k] - before[k]).abs().max() / before[k].abs().max().clamp(min=1e-12) for k in before]
    moved = max(changes)
    # an AdamW step of 1e-5 moves weights by less than bfloat16 can represent (2^-8 relative): kept in float32
    assert 0 < moved < 2 ** -8


def test_stop_when_ends_the_run_at_an_evaluation(tiny):
    model, tokenizer = fresh(tiny)
    run = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=10, learning_rate=1e-2, batch_size=2,
                  eval_every=3, evaluate=lambda m: {"x": 1.0}, stop_when=lambda trace: len(trace) == 3,
                  progress=False)
    assert run.stopped_at == 6 and len(run.log) == 6 and [r["step"] for r in run.trace] == [0, 3, 6]
    run = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=2, learning_rate=1e-2, batch_size=2,
                  evaluate=lambda m: {"x": 1.0}, stop_when=lambda trace: False, progress=False)
    assert run.stopped_at is None and len(run.log) == 2


def test_large_adapters_are_checkpointed_to_disk_and_read_back_the_same(tiny, monkeypatch):
    """`unlearn` keeps the checkpoints of an adapter above `DISK_CHECKPOINT_BYTES` in files (the
    paper profile's adapters), and reading one back gives the state kept in memory otherwise."""
    from probunlearn import unlearning

    runs = {}
    for keep in ("memory", "disk"):
        model, tokenizer = fresh(tiny)
        runs[keep] = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=4, learning_rate=1e-2, batch_size=2,
                             eval_every=2, evaluate=lambda m: {"x": 0.0}, keep_checkpoints=keep, progress=False)
    memory_run, disk_run = runs["memory"], runs["disk"]
    assert isinstance(disk_run.checkpoints, unlearning.DiskCheckpoints) and isinstance(memory_run.checkpoints, dict)
    assert list(disk_run.checkpoints) == list(memory_run.checkpoints) == [0, 2, 4]
    for step in (0, 2, 4):
        assert all(torch.equal(memory_run.checkpoints[step][k], v) for k, v in disk_run.checkpoints[step].items())
    folder = disk_run.checkpoints.folder
    assert len(list(folder.glob("*.safetensors"))) == 3
    monkeypatch.setattr(unlearning, "DISK_CHECKPOINT_BYTES", 0)  # the automatic choice: any adapter is "large"
    model, tokenizer = fresh(tiny)
    auto = unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=2, learning_rate=1e-2, batch_size=2,
                   evaluate=lambda m: {"x": 0.0}, progress=False)
    assert isinstance(auto.checkpoints, unlearning.DiskCheckpoints)
    del disk_run, runs, auto
    import gc

    gc.collect()
    assert not folder.exists()  # removed with the run


def test_gradient_checkpointing_takes_the_same_steps(tiny):
    """`start_unlearning(gradient_checkpointing=...)` (on by default on a GPU): recomputing the
    blocks in the backward pass gives the adapter the same updates."""
    from probunlearn.models import add_lora

    states = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = add_lora(__import__("copy").deepcopy(tiny["model"]), r=4, lora_alpha=8,
                         gradient_checkpointing=checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is checkpointing
        unlearn(model, tiny["tokenizer"], FORGET, RETAIN, method="npo", steps=3, learning_rate=1e-2, batch_size=2,
                progress=False)
        states.append(adapter_state(model))
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])
    assert any((v != 0).any() for k, v in states[0].items() if "lora_B" in k)


def test_full_fine_tuning_with_a_frozen_reference_runs_npo_against_the_target(tiny):
    """[P1]'s full fine-tuning has no adapter to switch off: `start_full_unlearning(reference=True)`
    keeps a frozen copy of the target, which NPO reads as π_ref while every weight moves."""
    from probunlearn.models import reference_model
    from tiny_unlearning import logits_of

    model, tokenizer = start_full_unlearning(tiny["path"], reference=True)
    target_logits = logits_of(model, tokenizer)
    trained = {id(p) for p in model.parameters()}
    with reference_model(model) as reference:  # the target, in the fast dtype (bfloat16 here: rounded)
        assert reference is not model and not any(id(p) in trained for p in reference.parameters())
        before = logits_of(reference, tokenizer)
        assert torch.allclose(before.float(), target_logits, atol=0.5)  # bfloat16 weights: up to 0.28 off here
    unlearn(model, tokenizer, FORGET, RETAIN, method="npo", steps=3, learning_rate=1e-3, batch_size=2, progress=False)
    with reference_model(model) as reference:  # frozen: exactly what it was
        assert torch.equal(logits_of(reference, tokenizer), before)
    assert not torch.allclose(logits_of(model, tokenizer), target_logits, atol=1e-3)  # the model moved
    plain, _ = start_full_unlearning(tiny["path"])
    with pytest.raises(TypeError, match="attach_reference"):
        unlearn(plain, tokenizer, FORGET, RETAIN, method="npo", steps=1, learning_rate=1e-3, batch_size=2, progress=False)


def test_start_runs_restarts_each_run_from_the_target_full_or_with_a_fresh_adapter_per_seed(tiny):
    """Notebook 04's runs, by `DYNAMICS_TUNING`: full fine-tuning restarts from the target's weights
    for every seed; LoRA restarts from a fresh adapter drawn from the run's seed (notebook 03's), so the
    plain and + EO runs of one seed start alike and two seeds start apart."""
    model, tokenizer, compute_dtype, restart = start_runs(tiny["path"], "full")
    target = adapter_state(model)
    assert compute_dtype == full_tuning_dtype(model) and len(target) == len(list(model.parameters()))
    unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=1, learning_rate=1e-3, batch_size=2, progress=False)
    assert any(not torch.equal(target[k], v) for k, v in adapter_state(model).items())
    restart(5)
    assert all(torch.equal(target[k], v) for k, v in adapter_state(model).items())

    model, tokenizer, compute_dtype, restart = start_runs(tiny["path"], "lora", lora_r=4)
    assert compute_dtype is None and all("lora_" in k for k in adapter_state(model))
    restart(1)
    first = adapter_state(model)
    assert all((v == 0).all() for k, v in first.items() if "lora_B" in k)  # adds nothing: the target
    unlearn(model, tokenizer, FORGET, RETAIN, method="ga", steps=1, learning_rate=1e-2, batch_size=2, progress=False)
    assert any((v != 0).any() for k, v in adapter_state(model).items() if "lora_B" in k)
    restart(1)
    assert all(torch.equal(first[k], v) for k, v in adapter_state(model).items())
    restart(2)
    assert any(not torch.equal(first[k], v) for k, v in adapter_state(model).items() if "lora_A" in k)
    with pytest.raises(ValueError, match="full, lora"):
        start_runs(tiny["path"], "qlora")


@pytest.mark.parametrize("method, positions", [(m, None) for m in ("ga", "gd", "ga_kl", "ga_mismatch", "npo", "ga_temp")]
                         + [("ga", "all"), ("npo", "answer")])
def test_micro_batches_take_the_step_of_the_whole_batch(tiny, method, positions):
    """`micro_batch_size` (a step that does not fit a GPU at once): every term averages over the whole
    step's answer tokens, rows or positions, so the parts' losses and gradients add up to the whole
    batch's, for every objective and both readings of the entropy term; answers of different lengths."""
    from probunlearn.objectives import entropy_regulariser

    seen = []

    def rows_seen(out):  # records the parts' forget rows; adds nothing
        seen.append(int(out.batches["forget"]["input_ids"].shape[0]))
        return {}

    rows_seen.parts = True
    regularisers = [rows_seen] + ([entropy_regulariser(positions=positions)] if positions else [])
    results = {}
    for micro in (None, 1):
        model, tokenizer = fresh(tiny)
        seen.clear()
        run = unlearn(model, tokenizer, FORGET, RETAIN, method=method, steps=3, learning_rate=1e-2, batch_size=4,
                      regularisers=regularisers, micro_batch_size=micro, seed=1, progress=False)
        results[micro] = (run.log, adapter_state(model), list(seen))
    (whole_log, whole, whole_seen), (parts_log, parts, parts_seen) = results[None], results[1]
    assert whole_seen == [4] * 3 and parts_seen == [1] * 12  # the parts did run one forget row at a time
    for a, b in zip(whole_log, parts_log):
        assert set(a) == set(b)
        assert all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6) for k in a if k != "seconds")
    # the adapters after three AdamW steps, up to rounding (AdamW divides by the gradients' own size, so
    # float32 rounding of small gradients moves single entries: 2e-5 of the update's norm at most on the
    # AVX2 stand-in, for ga_kl, whose KL term starts at its minimum)
    difference = sum(float((whole[k] - parts[k]).norm()) ** 2 for k in whole) ** 0.5
    update = sum(float(whole[k].norm()) ** 2 for k in whole if "lora_B" in k) ** 0.5  # lora_B starts at 0
    assert update > 0 and difference <= 1e-4 * update


def test_micro_batches_refuse_a_term_that_averages_by_itself(tiny):
    model, tokenizer = fresh(tiny)

    def own_mean(out):
        return {"extra": 0.0 * out.nll("retain")}

    with pytest.raises(ValueError, match="own_mean average"):
        unlearn(model, tokenizer, FORGET, RETAIN, method="gd", steps=1, learning_rate=1e-3, batch_size=2,
                regularisers=[own_mean], micro_batch_size=1, progress=False)
    run = unlearn(model, tokenizer, FORGET, RETAIN, method="gd", steps=1, learning_rate=1e-3, batch_size=2,
                  regularisers=[own_mean], progress=False)  # in whole batches it runs
    assert len(run.log) == 1
