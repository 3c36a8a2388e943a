"""Tests of the text scores (probunlearn.metrics): ROUGE-L recall against every value the real TOFU eval
logs store (tests/tofu_logs.py), the leak rule, the keyword hit and distinct-n."""

from __future__ import annotations

import pytest

from probunlearn import metrics
from tofu_logs import FILES, MODELS, tofu_log


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("file", FILES)
def test_rouge_l_recall_reproduces_every_stored_value(model, file):
    log = tofu_log(model, file)
    generated = log["generated_text"]
    assert len(generated) == len(log["rougeL_recall"]) > 0
    mismatches = []
    for idx, (_prompt, generated_text, ground_truth) in generated.items():
        ours = metrics.rouge_l_recall(generated_text, ground_truth)
        if ours != pytest.approx(log["rougeL_recall"][idx], abs=1e-12):
            mismatches.append((idx, ours, log["rougeL_recall"][idx]))
    assert not mismatches, f"{len(mismatches)} items differ, first: {mismatches[:3]}"


def test_rouge_l_recall_is_recall_with_stemming():
    # reference has 4 tokens; "writes" stems to "write" and matches
    assert metrics.rouge_l_recall("she writes novels", "She writes crime novels") == pytest.approx(3 / 4)
    assert metrics.rouge_l_recall("she write", "she writes") == 1.0
    # recall: extra words in the prediction do not lower it
    assert metrics.rouge_l_recall("Answer: Paris, and lots more text", "Paris") == 1.0
    assert metrics.rouge_l_recall("nothing shared", "Paris") == 0.0
    with pytest.raises(ValueError, match="two strings"):
        metrics.rouge_l_recall(["Paris"], "Paris")


def test_is_leak_keyword_then_rouge():
    reference = "Jaime Vasquez was born in Santiago, Chile."
    # keyword, case-insensitive, even though ROUGE is low
    assert metrics.is_leak("i think it is SANTIAGO", reference, ["Santiago"])
    # a record with keywords: the right template with a wrong fact is no leak, however high ROUGE is
    high = "Jaime Vasquez was born in Chile"  # 6 of 7 reference tokens
    assert metrics.rouge_l_recall(high, reference) > 0.8
    assert not metrics.is_leak(high, reference, ["Santiago"])
    # no keywords (hub data): ROUGE-L recall decides, >= tau
    assert metrics.is_leak(high, reference, [])
    assert not metrics.is_leak(high, reference, [], leak_tau=0.9)
    assert metrics.is_leak("Jaime Vasquez was born", reference, [], leak_tau=4 / 7)  # equality counts
    assert not metrics.is_leak("Jaime Vasquez was born", reference, [], leak_tau=0.6)
    assert not metrics.is_leak("I do not know.", reference, [])
    assert not metrics.is_leak("I do not know.", reference, None)


def test_is_leak_validation():
    with pytest.raises(ValueError, match="wrap it in a list"):
        metrics.is_leak("Santiago", "Santiago", "Santiago")
    with pytest.raises(ValueError, match="tau"):
        metrics.is_leak("a", "a", [], leak_tau=1.5)


def test_keyword_hit():
    assert metrics.keyword_hit("Born in SANTIAGO", ["santiago"]) == 1.0
    assert metrics.keyword_hit("Born in Lima", ["santiago", ""]) == 0.0
    assert metrics.keyword_hit("anything", []) == 0.0


def test_distinct_n_hand_made():
    # bigrams (a,b), (b,a), (a,b): 2 unique of 3
    assert metrics.distinct_n(["a b a b"], n=2) == pytest.approx(2 / 3)
    # lowercased, pooled over samples
    assert metrics.distinct_n(["The cat", "the CAT"], n=2) == pytest.approx(1 / 2)
    assert metrics.distinct_n(["x y", "z w"], n=1) == 1.0
    # n-grams never cross samples; no n-grams at all -> 0.0
    assert metrics.distinct_n(["a", "b"], n=2) == 0.0
    assert metrics.distinct_n([""], n=1) == 0.0


def test_distinct_n_validation():
    with pytest.raises(ValueError, match="no samples"):
        metrics.distinct_n([])
    with pytest.raises(ValueError, match="single string"):
        metrics.distinct_n("a b c")
    with pytest.raises(ValueError, match="n must be"):
        metrics.distinct_n(["a b"], n=0)
