"""Extraction Strength and Exact Memorization (probunlearn.metrics), the membership-inference attacks
and privleak (probunlearn.privacy), the holdout authors (probunlearn.data) and the bitsandbytes
reloads of the quantisation attack (probunlearn.models), on the tiny model of tests/tiny_lm.py."""

import zlib

import numpy as np
import pytest
import torch

from probunlearn.authors import fictitious_authors, holdout_authors
from probunlearn.data import split_by_author
from probunlearn.evaluation import metric_scorer, trace_metrics
from probunlearn.likelihood import answer_nll, answer_token_stats, exact_memorization, extraction_strength
from probunlearn.models import encode_answer, encode_prompt
from probunlearn.privacy import ATTACKS, all_mia_scores, mia_auc, mia_scores, privleak
from probunlearn.quantization import quantization_code_change, quantized_copy
from tiny_lm import EOS, tiny_model, tiny_tokenizer

QUESTIONS = ["bzracx ", "gztrsjoctzm", "vm wqiqzhgv", "td ichcuj", "kqpd", "var"]


@pytest.fixture(scope="module")
def eos_model():
    """The tiny model with the output rows of EOS and of its most frequent argmax token swapped, so
    that greedy decoding ends (the random model alone never predicts EOS)."""
    tokenizer, model = tiny_tokenizer(), tiny_model()
    with torch.no_grad():
        ids = torch.tensor([encode_prompt(tokenizer, q) for q in QUESTIONS if len(q) == 4])
        top = int(torch.mode(model(input_ids=ids).logits.argmax(-1).flatten()).values)
        top = top if top > 3 else 18
        weight = model.lm_head.weight
        weight[[EOS, top]] = weight[[top, EOS]]
    return model, tokenizer


def argmax_next(model, ids):
    with torch.no_grad():
        return int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())


def greedy_continuation(model, ids, steps):
    out = []
    for _ in range(steps):
        out.append(argmax_next(model, ids + out))
    return out


def brute_force_k_star(model, tokenizer, question, answer):
    """The smallest k such that greedy decoding after prompt + y[:k] reproduces y[k:] token by token."""
    prompt, y = encode_prompt(tokenizer, question), encode_answer(tokenizer, answer)
    for k in range(len(y) + 1):
        if greedy_continuation(model, prompt + y[:k], len(y) - k) == y[k:]:
            return k, len(y)
    raise AssertionError("k = |y| always reproduces the (empty) rest")


def own_answer(model, tokenizer, context, steps=12):
    """The text of the model's greedy continuation of `context` when it ends with EOS, else None."""
    out = []
    for _ in range(steps):
        out.append(argmax_next(model, context + out))
        if out[-1] == EOS:
            break
    if out[-1] != EOS or any(t <= 3 for t in out[:-1]) or len(out) < 2:
        return None
    return tokenizer.decode(out[:-1])


def test_extraction_strength_equals_a_brute_force_search_by_greedy_decoding(eos_model):
    model, tokenizer = eos_model
    items = []
    for q in QUESTIONS:
        own = own_answer(model, tokenizer, encode_prompt(tokenizer, q))
        if own is not None:
            items.append((q, own))  # the model says it unprompted: k* = 0
            items.append((q, own + "xq"))  # a tail it does not say: nothing reproduces the ending
            prefix = "Ab"
            rest = own_answer(model, tokenizer, encode_prompt(tokenizer, q) + encode_answer(tokenizer, prefix)[:-1])
            if rest is not None:
                items.append((q, prefix + rest))  # reproduced once two tokens are given: 0 < k* <= 2
    items += [(q, "the same answer") for q in QUESTIONS[:3]]
    questions, answers = zip(*items)
    es = extraction_strength(model, tokenizer, questions, answers, batch_size=4)
    k_stars = []
    for (q, a), value in zip(items, es):
        k_star, length = brute_force_k_star(model, tokenizer, q, a)
        k_stars.append((k_star, length))
        assert value == pytest.approx(1 - k_star / length), (q, a)
    assert any(k == 0 for k, _ in k_stars), "an answer reproduced from the prompt alone (ES 1)"
    assert any(k == n for k, n in k_stars), "an answer no prefix reproduces (ES 0)"
    assert any(0 < k < n for k, n in k_stars), "an answer reproduced from a proper prefix"
    assert es.max() == 1.0 and es.min() == 0.0


def test_exact_memorization_is_one_on_the_argmax_path_and_zero_off_it(eos_model):
    model, tokenizer = eos_model
    q = next(q for q in QUESTIONS if own_answer(model, tokenizer, encode_prompt(tokenizer, q)) is not None)
    reproduced = own_answer(model, tokenizer, encode_prompt(tokenizer, q))
    prompt, never = encode_prompt(tokenizer, q), []
    with torch.no_grad():
        for _ in range(6):  # at every position the least likely letter: never the argmax
            logits = model(input_ids=torch.tensor([prompt + never])).logits[0, -1]
            logits[:4] = float("inf")
            never.append(int(logits.argmin()))
    assert argmax_next(model, prompt + never) != EOS  # and the closing EOS is not predicted either
    em = exact_memorization(model, tokenizer, [q, q], [reproduced, tokenizer.decode(never)])
    assert em.tolist() == [1.0, 0.0]


def test_token_stats_agree_with_answer_nll_and_the_full_distribution():
    tokenizer, model = tiny_tokenizer(), tiny_model()
    answers = ["an answer", "b", "a longer answer here"]
    stats = answer_token_stats(model, tokenizer, QUESTIONS[:3], answers, batch_size=2, distribution=True)
    nll = answer_nll(model, tokenizer, QUESTIONS[:3], answers)
    assert [len(s["logprob"]) for s in stats] == [len(encode_answer(tokenizer, a)) for a in answers]
    np.testing.assert_allclose([-s["logprob"].mean() for s in stats], nll, rtol=1e-5)
    # Min-K%++'s mean and std of log p(v) under p, from one plain forward pass of the last item
    ids = encode_prompt(tokenizer, QUESTIONS[2]) + encode_answer(tokenizer, answers[2])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    start = len(encode_prompt(tokenizer, QUESTIONS[2])) - 1
    positions = logp[start:len(ids) - 1]
    mean = (positions.exp() * positions).sum(-1)
    std = ((positions.exp() * (positions - mean[:, None]) ** 2).sum(-1)).sqrt()
    np.testing.assert_allclose(stats[2]["expected"], mean.numpy(), rtol=1e-4)
    np.testing.assert_allclose(stats[2]["std"], std.numpy(), rtol=1e-3)


def test_attack_statistics_follow_their_definitions():
    tokenizer, model = tiny_tokenizer(), tiny_model()
    answers = ["an answer", "b", "a longer answer here", "qq"]
    questions = QUESTIONS[:4]
    loss = mia_scores(model, tokenizer, questions, answers, attack="loss")
    np.testing.assert_allclose(loss, answer_nll(model, tokenizer, questions, answers), rtol=1e-5)
    np.testing.assert_allclose(mia_scores(model, tokenizer, questions, answers, attack="min_k", k=1.0), loss, rtol=1e-6)
    zlib_scores = mia_scores(model, tokenizer, questions, answers, attack="zlib")
    np.testing.assert_allclose(zlib_scores, loss / [len(zlib.compress(a.encode())) for a in answers], rtol=1e-6)
    stats = answer_token_stats(model, tokenizer, questions, answers, distribution=True)
    lowest = [-np.sort(s["logprob"])[:max(1, int(0.4 * len(s["logprob"])))].mean() for s in stats]
    np.testing.assert_allclose(mia_scores(model, tokenizer, questions, answers, attack="min_k"), lowest, rtol=1e-6)
    z = [(s["logprob"] - s["expected"]) / s["std"] for s in stats]
    lowest_pp = [-np.sort(v)[:max(1, int(0.4 * len(v)))].mean() for v in z]
    np.testing.assert_allclose(mia_scores(model, tokenizer, questions, answers, attack="min_k_pp"), lowest_pp, rtol=1e-5)
    every = all_mia_scores(model, tokenizer, questions, answers)
    assert set(every) == set(ATTACKS)
    np.testing.assert_allclose(every["loss"], loss, rtol=1e-6)
    # the minimum-k share takes at least one token, and the lowest ones: min_k >= loss
    assert (mia_scores(model, tokenizer, questions, answers, attack="min_k", k=0.01) >= loss - 1e-9).all()
    with pytest.raises(ValueError, match="unknown attack"):
        mia_scores(model, tokenizer, questions, answers, attack="neighbour")


def test_mia_auc_equals_a_hand_computed_auc_and_privleak_its_formula():
    members, nonmembers = [0.1, 0.4, 0.35, 0.9], [0.8, 0.4, 0.3, 0.95, 0.2]
    pairs = [(m < n) + 0.5 * (m == n) for m in members for n in nonmembers]
    assert mia_auc(members, nonmembers) == pytest.approx(sum(pairs) / len(pairs))
    assert mia_auc([0, 0.1], [0.5, 0.7]) == 1.0 and mia_auc([0.5, 0.7], [0, 0.1]) == 0.0
    assert mia_auc([0.3, 0.3], [0.3]) == 0.5
    assert privleak(0.75, 0.5) == pytest.approx(0.5) and privleak(0.5, 0.5) == 0.0
    with pytest.raises(ValueError):
        privleak(0.5, 0.0)


def test_holdout_authors_share_no_name_or_keyword_with_the_trained_authors():
    trained = fictitious_authors(12, 16, seed=0)
    holdout = holdout_authors(trained, 6, 16, seed=0)
    assert len(set(holdout["author"])) == 6 and len(holdout) == 6 * 16
    taken = {v.lower() for v in trained["author"]} | {k.lower() for ks in trained["keywords"] for k in ks}
    for record in holdout:
        assert record["author"].lower() not in taken
        assert not {k.lower() for k in record["keywords"]} & taken
        for wrong in record["perturbed_answer"]:  # no perturbed answer names a trained fact either
            assert not any(value in wrong.lower() for value in taken if len(value) > 4 and value not in record["answer"].lower())
    assert holdout.to_list() == holdout_authors(trained, 6, 16, seed=0).to_list()  # deterministic
    assert fictitious_authors(12, 16, seed=0).to_list() == trained.to_list()  # the trained data is untouched


def test_bar_metric_extraction_strength_is_traced_and_scored():
    tokenizer, model = tiny_tokenizer(), tiny_model()
    data = fictitious_authors(2, 3, seed=0)
    forget, retain = split_by_author(data, 0.5, seed=0)
    sets = {"forget": forget, "retain": retain}
    row = trace_metrics(model, tokenizer, sets, max_new_tokens=4, per_question=True)
    for split, dataset in sets.items():
        es = extraction_strength(model, tokenizer, dataset["question"], dataset["answer"])
        em = exact_memorization(model, tokenizer, dataset["question"], dataset["answer"])
        assert row[f"{split}_extraction_strength"] == pytest.approx(es.mean())
        assert row[f"{split}_exact_memorization"] == pytest.approx(em.mean())
        assert row[f"{split}_extraction_strength_per_question"] == pytest.approx(es.round(6).tolist())
    score = metric_scorer(tokenizer, sets, "retain_extraction_strength", max_new_tokens=4)
    assert score(model) == pytest.approx(row["retain_extraction_strength"])


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_a_quantized_reload_of_a_small_model_runs_on_cpu(quantization):
    import bitsandbytes as bnb

    # bitsandbytes' CPU kernel for AVX512-BF16 needs the input width to be a multiple of the 4-bit block (64)
    model = tiny_model(hidden_size=64)
    quantized = quantized_copy(model, quantization)
    layer = {"4bit": bnb.nn.Linear4bit, "8bit": bnb.nn.Linear8bitLt}[quantization]
    assert isinstance(quantized.model.layers[0].mlp.up_proj, layer)
    assert not isinstance(model.model.layers[0].mlp.up_proj, layer)  # the original is unchanged
    ids = torch.tensor([[2, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        original, reloaded = model(input_ids=ids).logits, quantized(input_ids=ids).logits
    assert torch.isfinite(reloaded).all()
    assert torch.corrcoef(torch.stack([original.flatten(), reloaded.flatten()]))[0, 1] > 0.8
    if quantization == "4bit":
        assert quantization_code_change(quantized, quantized) == 0.0
        # `quantized` ran (on an AVX512-BF16 CPU bitsandbytes repacks its codes then), `other` did not
        other = quantized_copy(tiny_model(seed=1, hidden_size=64), "4bit")
        assert quantization_code_change(quantized, other) > 0.5
        assert quantization_code_change(quantized, quantized_copy(model, "4bit")) == 0.0
