"""Tests of probunlearn.probabilistic (SPEC §5): per-question bounds, bounds against n, the coverage
simulation, model discovery and a full evaluation of a tiny model on a tiny split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset

from probunlearn import bounds, probabilistic, results
from tiny_lm import tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def test_question_bounds_match_the_bounds_module():
    rng = np.random.default_rng(0)
    scores = np.round(rng.beta(0.5, 1.0, size=(5, 40)), 2)
    leaks = scores >= 0.5
    table = probabilistic.question_bounds(scores, leaks, alpha=0.05, ed_weight=1.5)
    assert len(table) == 5
    np.testing.assert_allclose(table["m_bin"], bounds.binary_leak_upper(leaks, 0.05))
    np.testing.assert_allclose(table["m_mu"], bounds.mean_upper(scores, 0.05))
    np.testing.assert_allclose(table["m_sigma"], bounds.std_upper(scores, 0.05))
    np.testing.assert_allclose(table["ed"], bounds.ed_score(scores, 0.05, ed_weight=1.5))
    np.testing.assert_allclose(table["mean_rouge_l"], scores.mean(1))
    assert (table["m_bin"] >= table["leak_rate"]).all() and (table["m_mu"] >= table["mean_rouge_l"]).all()
    with pytest.raises(ValueError, match="questions x samples"):
        probabilistic.question_bounds(scores, leaks[:, :3])


def test_bounds_vs_n_tighten():
    rng = np.random.default_rng(1)
    scores = rng.beta(2, 5, size=(20, 64))
    curve = probabilistic.bounds_vs_n(scores, scores >= 0.5, alpha=0.01)
    assert curve["n"].tolist() == [1, 2, 4, 8, 16, 32, 64]
    for column in ("m_bin", "m_mu", "ed"):
        assert curve[column].is_monotonic_decreasing, column
    assert curve["m_mu"].iloc[0] == pytest.approx(1.0)  # one sample: the band is vacuous
    with pytest.raises(ValueError, match="sample sizes"):
        probabilistic.bounds_vs_n(scores, scores >= 0.5, [0, 5])


def test_coverage_simulation_holds_at_small_scale():
    pools = {"a pool of real scores": np.array([0.0, 0.0, 0.1, 0.5, 1.0])}
    distributions = probabilistic.coverage_distributions(pools=pools)
    table = probabilistic.coverage_simulation((10, 40), trials=400, alpha=0.1, distributions=distributions)
    assert set(table["distribution"]) == set(distributions) and len(table) == len(distributions) * 2 * 4
    slack = 3 * np.sqrt(0.1 * 0.9 / 400)
    single = table[table["bound"] != "ed"]
    assert (single["failure_rate"] <= 0.1 + slack).all()
    assert (table.loc[table["bound"] == "ed", "failure_rate"] <= 0.2 + slack).all()
    assert (table["slack"] > -0.05).all()


def test_list_models_and_subset(tmp_path):  # results.list_models, probabilistic.spread_subset
    for name in ("target", "retain", "ga", "npo"):
        (tmp_path / "models" / name).mkdir(parents=True)
        (tmp_path / "models" / name / "probunlearn.json").write_text(json.dumps({"base": "x"}))
    (tmp_path / "models" / "not_a_model").mkdir()
    for seed in (0, 2):  # an unlearned model of notebook 03: one per seed
        (tmp_path / "models" / "ga_mix" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "models" / "ga_mix" / f"seed{seed}" / "probunlearn.json").write_text(json.dumps({"base": "x"}))
    models = results.list_models(tmp_path, "smollm2-135m")
    assert list(models) == ["base", "target", "retain", "ga", "ga_mix", "npo"]
    assert models["base"] == {None: "smollm2-135m"} and list(models["target"]) == [None]
    assert models["ga_mix"] == {0: str(tmp_path / "models" / "ga_mix" / "seed0"), 2: str(tmp_path / "models" / "ga_mix" / "seed2")}
    data = Dataset.from_list([{"question": str(i)} for i in range(10)])
    assert probabilistic.spread_subset(data, 3)["question"] == ["0", "4", "9"]
    assert len(probabilistic.spread_subset(data, None)) == 10 and len(probabilistic.spread_subset(data, 50)) == 10


def test_evaluate_split_on_a_tiny_model(tmp_path):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    data = Dataset.from_list([
        {"question": "who is it?", "answer": "it is me", "keywords": ["e"]},  # a one-letter keyword leaks often
        {"question": "where?", "answer": "here", "keywords": []},  # no keyword: ROUGE-L >= tau
    ])
    table, raw = probabilistic.evaluate_split(model, tokenizer, data, num_samples=16, max_new_tokens=6,
                                              alpha=0.05, progress=False)
    assert raw["scores"].shape == raw["leaks"].shape == (2, 16) and len(raw["samples"][0]) == 16
    assert {"greedy", "greedy_rouge_l", "greedy_leak", "m_bin", "m_mu", "m_sigma", "ed", "distinct_2"} <= set(table)
    expected_leaks = [["e" in s.lower() for s in raw["samples"][0]], list(raw["scores"][1] >= 0.5)]
    np.testing.assert_array_equal(raw["leaks"], expected_leaks)
    assert ((table[["m_bin", "m_mu", "m_sigma"]] >= 0) & (table[["m_bin", "m_mu", "m_sigma"]] <= 1)).all().all()
    summary = probabilistic.summarise(table, raw["leaks"], mbin_threshold=0.1)
    assert summary["samples"] == 16 and "leak_at_16" in summary and "leak_at_32" not in summary
    probabilistic.save_split_results(tmp_path, "tiny", "forget", table, raw)
    again, raw_again = probabilistic.load_split_results(tmp_path, "tiny", "forget")
    assert again["greedy"].tolist() == table["greedy"].tolist()
    np.testing.assert_array_equal(raw_again["leaks"], raw["leaks"])
    np.testing.assert_allclose(raw_again["scores"], raw["scores"], atol=1e-6)


def test_clean_questions_get_more_samples_and_their_bounds_use_all_of_them():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    data = Dataset.from_list([
        {"question": "who is it?", "answer": "it is me", "keywords": ["zzzz"]},  # the tiny model never says it
        {"question": "where?", "answer": "here", "keywords": []},  # no keyword, ROUGE-L >= 0: every answer leaks
    ])
    kwargs = dict(num_samples=4, max_new_tokens=4, alpha=0.05, leak_tau=0.0, progress=False, seed=3)
    plain = probabilistic.evaluate_model(model, tokenizer, {"forget": data}, **kwargs)["forget"]
    table, raw = probabilistic.evaluate_model(model, tokenizer, {"forget": data}, clean_samples=10, **kwargs)["forget"]
    assert table["greedy_leak"].tolist() == [0.0, 1.0] and table["n"].tolist() == [10, 4]
    assert [len(s) for s in raw["samples"]] == [10, 4] and raw["scores"].shape == raw["leaks"].shape == (2, 4)
    assert raw["samples"][0][:4] == plain[1]["samples"][0]  # the first samples are those of the plain run
    assert len(raw["more_scores"][0]) == 6 and raw["more_scores"][1] == []
    # the bounds of the clean question use its 10 samples: no leak in 10 gives 1 - alpha^(1/10)
    np.testing.assert_allclose(table["m_bin"][0], bounds.binary_leak_upper(np.zeros(10, bool), 0.05))
    np.testing.assert_allclose(table["m_bin"][1], 1.0)
    cells = probabilistic.question_cells(table)
    assert cells["n"].tolist() == [10, 4] and cells["leaks_within_n"].tolist() == [0.0, 1.0]


def test_claim_table_reads_leaks_of_greedily_clean_questions():
    import pandas as pd

    rows = []
    for seed in (0, 1):
        for q, (greedy, within, rate) in enumerate([(1, 1, 0.5), (0, 1, 0.1), (0, 0, 0.0), (0, 1, 0.2)]):
            rows.append({"model": "m", "seed": seed, "question": q, "greedy_leak": float(greedy),
                         "leaks_within_n": float(within), "leak_rate": rate, "n": 16 if greedy else 64})
    claim = probabilistic.claim_table(pd.DataFrame(rows))
    row = claim.iloc[0]
    assert row["greedy_leak"] == 0.25 and row["leaks_within_n"] == 0.75 and row["clean_cells"] == 6
    np.testing.assert_allclose(row["leak_given_clean"], 2 / 3)
    assert row["leak_given_clean_low"] <= row["leak_given_clean"] <= row["leak_given_clean_high"]
    assert row["n_clean"] == "64" and row["n_leaking"] == "16" and row["seeds"] == 2


def test_greedy_agreement_maps_notebook_03s_subset_onto_all_questions():
    import pandas as pd

    ours = pd.DataFrame({"model": "ga_mix", "seed": 0, "question": range(5), "greedy_leak": [1.0, 0, 0, 1, 0]})
    theirs = pd.DataFrame({"method": "ga", "variant": "mixed", "seed": 0, "split": "forget", "question": [0, 1, 2],
                           "keyword_hit": [1.0, 0.0, 1.0]})  # 3 spread questions of 5: 0, 2, 4
    agreement = probabilistic.greedy_agreement(ours, theirs, forget_size=5)
    assert agreement["question"].tolist() == [0, 2, 4] and agreement["agree"].tolist() == [1.0, 1.0, 0.0]


def test_claim_verdicts_compare_clean_questions_with_the_retain_model_on_the_same_questions():
    import pandas as pd

    rows = [{"model": "retain", "seed": 0, "question": q, "greedy_leak": 0.0, "leak_rate": 0.0} for q in range(6)]
    for seed in (0, 1, 2):
        rows += [{"model": "hides", "seed": seed, "question": q, "greedy_leak": float(q == 0), "leak_rate": 0.3 + 0.01 * q}
                 for q in range(6)]
        rows += [{"model": "forgot", "seed": seed, "question": q, "greedy_leak": 0.0, "leak_rate": 0.0} for q in range(6)]
    table = probabilistic.claim_verdicts(pd.DataFrame(rows)).set_index("model")
    assert table.loc["hides", "clean_cells"] == 15 and table.loc["hides", "verdict"] == "higher"
    assert table.loc["hides", "mean_difference"] == pytest.approx(0.33, abs=1e-9)  # model - retain
    assert table.loc["forgot", "verdict"] == "no difference" and np.isnan(table.loc["forgot", "p_value_holm"])
    assert "retain" not in table.index
