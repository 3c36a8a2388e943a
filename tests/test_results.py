"""What the notebooks leave in a results folder (probunlearn.results): named artefacts written and read
back, where an unlearned model is saved, and the saved models a notebook evaluates per seed."""

import json

import pandas as pd
import pytest

from probunlearn import results


def test_artefacts_round_trip_by_name_and_a_missing_one_names_what_to_run(tmp_path):
    summary = {"profile": "smoke", "bar": 0.5}
    table = pd.DataFrame({"model": ["ga", "npo"], "m_bin": [0.25, 0.5]})
    assert results.save_artefact(tmp_path, "attacks_summary", summary) == tmp_path / "attacks" / "summary.json"
    results.save_artefact(tmp_path, "attack_cells", table)
    results.save_artefact(tmp_path, "attack_table", table)  # a table also written as Markdown
    assert results.read_artefact(tmp_path, "attacks_summary") == summary
    pd.testing.assert_frame_equal(results.read_artefact(tmp_path, "attack_cells"), table)
    assert (tmp_path / "attacks" / "table.md").read_text().startswith("| model")
    assert not (tmp_path / "attacks" / "cells.md").exists()
    with pytest.raises(FileNotFoundError, match="run the notebook"):
        results.read_artefact(tmp_path, "entropy_cells")
    with pytest.raises(KeyError, match="attack_table"):
        results.artefact_path(tmp_path, "attack_tabel")


def test_saved_model_names_follow_the_control():
    assert [results.model_name("ga", c) for c in ("uncontrolled", "early stopped", "mixed")] == ["ga", "ga_es", "ga_mix"]
    assert results.saved_model_dir("r", "npo", "mixed", 2).as_posix() == "r/models/npo_mix/seed2"
    with pytest.raises(KeyError, match="early stopped"):
        results.model_name("ga", "stopped")


def test_model_runs_keep_this_runs_seeds_and_run_a_seedless_model_once(tmp_path):
    def save(path):
        path.mkdir(parents=True)
        (path / "probunlearn.json").write_text(json.dumps({"base": "x"}))

    save(tmp_path / "models" / "target")
    for seed in (0, 1, 2):  # seed 2: a model of an earlier run with more seeds
        save(tmp_path / "models" / "ga_mix" / f"seed{seed}")
    models, runs = results.model_runs(tmp_path, "smollm2-135m", ["ga_mix", "target", "absent"], seeds=[1, 0])
    assert list(models) == ["target", "ga_mix"] and list(models["ga_mix"]) == [0, 1]
    assert [(name, seed) for name, seed, _ in runs] == [("target", 1), ("ga_mix", 0), ("ga_mix", 1)]
    assert runs[0][2] == str(tmp_path / "models" / "target")


def test_same_models_finds_identical_unlearned_models_and_the_target(tmp_path):
    def save(path, **meta):
        path.mkdir(parents=True)
        (path / "probunlearn.json").write_text(json.dumps({"base": "x", **meta}))

    save(tmp_path / "target")
    save(tmp_path / "gd" / "seed0", method="gd", seed=0, step=9, **{"lambda": 0.0})
    save(tmp_path / "gd_es" / "seed0", method="gd", seed=0, step=9, **{"lambda": 0.0})  # stopped at the last step
    save(tmp_path / "gd_es" / "seed1", method="gd", seed=1, step=9, **{"lambda": 0.0})  # another seed: another model
    save(tmp_path / "gd_mix" / "seed0", method="gd", seed=0, step=9, **{"lambda": 0.25})
    save(tmp_path / "ga_temp_mix" / "seed1", method="ga_temp", seed=1, step=9, **{"lambda": 1.0})  # the target
    runs = [("target", 0, str(tmp_path / "target"))] + [
        (name, seed, str(tmp_path / name / f"seed{seed}"))
        for name, seed in (("gd", 0), ("gd_es", 0), ("gd_es", 1), ("gd_mix", 0), ("ga_temp_mix", 1))]
    assert results.same_models(runs) == {("gd_es", 0): ("gd", 0), ("ga_temp_mix", 1): ("target", 0)}
    assert results.model_identity(tmp_path / "target") == ("path", str(tmp_path / "target"))
