"""[P2]'s control of excessive unlearning: model mixing, the bisection for the mixing weight, early stopping,
and both applied to a run."""

import pytest
import torch
from datasets import Dataset

from probunlearn.control import bisect_mixing, early_stopping, mixed_model, unlearn_with_control, utility_bar
from probunlearn.models import load_model, save_adapter
from probunlearn.unlearning import adapter_state, start_unlearning
from tiny_unlearning import FORGET, RETAIN, fresh, logits_of, perturb_adapter


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


def test_variant_cells_and_the_ranking_by_distance_to_the_retain_model():
    """SPEC §4: rank by the distance to the retain model; the lowest forget score rewards damage."""
    import pandas as pd

    from probunlearn.control import rank_methods, variant_cells
    from probunlearn.evaluation import question_cells, retain_distance, summarise_splits

    def evaluation(forget):
        return {"evaluation": {"forget_rouge_l_recall_per_question": forget,
                               "retain_rouge_l_recall_per_question": [1.0, 1.0]}}

    # retain model: 0.6 on both forget questions; "broken" scores 0 (damage), "close" stays near 0.6
    variants = {(seed, method): {"uncontrolled": evaluation(forget), "mixed": evaluation(forget)}
                for seed in (0, 1) for method, forget in (("broken", [0.0, 0.1]), ("close", [0.6, 0.7]),
                                                          ("remembers", [1.0, 1.0]))}
    cells = variant_cells(variants, metrics=["rouge_l_recall"])
    assert len(cells) == 2 * 3 * 2 * 2 * 2
    assert cells.columns.tolist() == ["seed", "method", "variant", "split", "question", "rouge_l_recall"]
    retain = question_cells({"forget_rouge_l_recall_per_question": [0.6, 0.6],
                             "retain_rouge_l_recall_per_question": [1.0, 1.0]}, ["rouge_l_recall"])
    cells = retain_distance(cells, retain, ["rouge_l_recall"])
    summary = summarise_splits(cells, ["rouge_l_recall", "rouge_l_recall_distance"])
    ranking = rank_methods(summary, variants=("mixed", "uncontrolled"))
    mixed = ranking[ranking["variant"] == "mixed"]
    assert mixed["method"].tolist() == ["close", "remembers", "broken"]
    assert mixed["method_by_lowest_forget_rouge_l_recall"].tolist() == ["broken", "close", "remembers"]
    assert mixed["rank"].tolist() == [1, 2, 3]
    assert mixed["forget_rouge_l_recall_distance"].tolist() == pytest.approx([0.05, 0.4, 0.55])
    assert {"forget_rouge_l_recall_distance_low", "forget_rouge_l_recall_distance_high",
            "forget_rouge_l_recall_low"} <= set(ranking.columns)
    with pytest.raises(KeyError, match="retain_distance"):
        rank_methods(summary.drop(columns="forget_rouge_l_recall_distance_low"))
    assert isinstance(ranking, pd.DataFrame)
