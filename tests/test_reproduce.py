"""`make reproduce` resumes: a finished notebook is skipped while its notebook, settings, package code
and upstream notebooks are unchanged, and rerun (with everything after it) when one changes."""

import json

import nbformat
import numpy as np

from probunlearn.reproduce import run


def _notebook(path, body):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell('PROFILE = "cpu"\nRESULTS_ROOT = "../results"\nSEED = 0')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body)]
    nbformat.write(nb, path)


def test_reproduce_skips_finished_notebooks_and_reruns_what_changed(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    count = ("from pathlib import Path\n"
             "log = Path(RESULTS_ROOT) / 'runs.txt'\n"
             "log.parent.mkdir(parents=True, exist_ok=True)\n"
             "log.open('a').write('{name} %s\\n' % SEED)")
    _notebook(notebooks / "01_a.ipynb", count.format(name="a"))
    _notebook(notebooks / "02_b.ipynb", count.format(name="b"))
    root = tmp_path / "results"

    def runs():
        return (root / "runs.txt").read_text().split()[::2]

    kwargs = dict(profile="smoke", results_root=root, figures_dir=tmp_path / "figures", progress=False,
                  notebook_dir=notebooks)
    first = run(**kwargs)
    assert runs() == ["a", "b"] and not any(r["cached"] for r in first.values())
    stamp = json.loads((root / "smoke" / "executed" / "01_a.done.json").read_text())
    assert stamp["profile"] == "smoke" and stamp["seconds"] > 0
    second = run(**kwargs)  # nothing changed: nothing reruns
    assert runs() == ["a", "b"] and all(r["cached"] for r in second.values())
    _notebook(notebooks / "02_b.ipynb", count.format(name="b") + "\n# edited")
    run(**kwargs)  # only the edited notebook reruns
    assert runs() == ["a", "b", "b"]
    _notebook(notebooks / "01_a.ipynb", count.format(name="a") + "\n# edited")
    run(**kwargs)  # an upstream change reruns everything after it too
    assert runs() == ["a", "b", "b", "a", "b"]
    (root / "smoke" / "executed" / "02_b.done.json").unlink()  # interrupted before 02 finished
    run(**kwargs)
    assert runs() == ["a", "b", "b", "a", "b", "b"]
    run(**kwargs, force=True)
    assert runs()[-2:] == ["a", "b"]


def test_a_vllm_profile_fails_before_the_first_notebook_where_vllm_is_missing():
    import pytest

    from probunlearn.reproduce import check_sampler
    from probunlearn.utils import load_profile
    from probunlearn.vllm_backend import vllm_available

    assert load_profile("paper")["SAMPLER"] == "vllm"
    assert all(load_profile(p)["SAMPLER"] == "ours" for p in ("smoke", "tofu-smoke", "cpu"))
    check_sampler(load_profile("cpu"))  # our sampler needs nothing more
    if vllm_available():
        check_sampler(load_profile("paper"))
    else:
        with pytest.raises(SystemExit, match="make vllm"):
            check_sampler(load_profile("paper"))


def _sized_profile(monkeypatch, **extra):
    import probunlearn.reproduce as reproduce

    settings = {"PROFILE": "smoke", "SEED": 0, "STEPS": 10, "SAMPLES": 16, "SLOW_CPU_GFLOPS": 150.0,
                "SLOW_CPU_SIZES": {"STEPS": 5}, **extra}
    monkeypatch.setattr(reproduce, "load_profile", lambda name: dict(settings))
    return settings


def test_slow_cpu_sizes_apply_below_the_profiles_rate_and_only_on_request_otherwise(monkeypatch):
    import pytest

    from probunlearn.reproduce import slow_cpu_sizes

    settings = {"PROFILE": "cpu", "STEPS": 10, "SLOW_CPU_GFLOPS": 150, "SLOW_CPU_SIZES": {"STEPS": 5}}
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    changed, why = slow_cpu_sizes(settings, "auto", rate=118.0)
    assert changed == {"STEPS": 5} and "118 GFLOP/s" in why and "below" in why
    changed, why = slow_cpu_sizes(settings, "auto", rate=230.0)
    assert changed == {} and "full sizes" in why
    assert slow_cpu_sizes(settings, "full", rate=10.0)[0] == {}
    assert slow_cpu_sizes(settings, "slow", rate=1e6)[0] == {"STEPS": 5}
    assert slow_cpu_sizes({"PROFILE": "smoke", "STEPS": 10}, "slow")[0] == {}  # a profile without slow sizes
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert slow_cpu_sizes(settings, "auto", rate=1.0)[0] == {}  # GPU runs keep the full sizes
    with pytest.raises(ValueError, match="does not have: STEPZ"):
        slow_cpu_sizes({**settings, "SLOW_CPU_SIZES": {"STEPZ": 5}}, "slow")
    with pytest.raises(ValueError, match="sizes must be one of"):
        slow_cpu_sizes(settings, "small")


def test_the_cpu_profiles_slow_sizes_are_smaller_settings_it_has_and_its_measured_rate_is_positive():
    from probunlearn.hardware import matrix_gflops
    from probunlearn.utils import load_profile

    cpu = load_profile("cpu")
    slow = cpu["SLOW_CPU_SIZES"]
    assert slow and set(slow) <= set(cpu) and cpu["SLOW_CPU_GFLOPS"] > 0
    assert all(slow[k] != cpu[k] for k in slow)
    # the n for greedily clean questions (at either size) can still show one forgotten: zero leaks bound below the threshold
    from probunlearn.bounds import binary_leak_upper

    floor = binary_leak_upper(np.zeros({**cpu, **slow}["CLEAN_SAMPLES"], bool), alpha=cpu["ALPHA"])
    assert floor < cpu["MBIN_THRESHOLD"]
    assert matrix_gflops(repeats=2) > 0


def test_a_notebook_gets_the_slow_sizes_it_reads_and_a_note_that_says_so(tmp_path, monkeypatch):
    import pytest

    from probunlearn.reproduce import run

    _sized_profile(monkeypatch)
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name in ("01_reads.ipynb", "02_other.ipynb"):
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        reads = "STEPS = 10\n" if name.startswith("01") else "SAMPLES = 16\n"
        params = nbformat.v4.new_code_cell('RESULTS_ROOT = "../results"\n' + reads + 'SIZES_NOTE = ""')
        params.metadata["tags"] = ["parameters"]
        body = ("import json, pathlib\n"
                f"pathlib.Path(RESULTS_ROOT, '{name}.json').write_text(json.dumps({{k: v for k, v in globals().items() "
                "if k.isupper()}))")
        nb.cells = [params, nbformat.v4.new_code_cell(body)]
        nbformat.write(nb, notebooks / name)
    root = tmp_path / "results"
    kwargs = dict(profile="smoke", results_root=root, figures_dir=tmp_path / "figures", progress=False,
                  notebook_dir=notebooks)
    run(**kwargs, sizes="slow")
    reads = json.loads((root / "01_reads.ipynb.json").read_text())
    other = json.loads((root / "02_other.ipynb.json").read_text())
    assert reads["STEPS"] == 5 and "STEPS 10 -> 5" in reads["SIZES_NOTE"]
    assert other["SIZES_NOTE"] == ""  # it reads no changed setting: nothing to say
    stamps = {name: json.loads((root / "smoke" / "executed" / f"{name}.done.json").read_text())
              for name in ("01_reads", "02_other")}
    assert stamps["01_reads"]["changed_settings"] == {"STEPS": 5} and stamps["02_other"]["changed_settings"] == {}
    # a resumed run on the same slow CPU, whose measured rate moved (the note says 118, then 121 GFLOP/s):
    # the same settings, so nothing reruns
    import probunlearn.reproduce as reproduce

    for rate in (118.0, 121.0):
        monkeypatch.setattr(reproduce, "matrix_gflops", lambda dtype, rate=rate: rate)
        report = run(**kwargs, sizes="auto")
    assert all(r["cached"] for r in report.values())
    run(**kwargs, sizes="full")  # other settings: the notebooks rerun with the profile's own
    assert json.loads((root / "01_reads.ipynb.json").read_text())["STEPS"] == 10
    # a notebook that reads a changed setting must be able to say so
    nb = nbformat.read(notebooks / "01_reads.ipynb", as_version=4)
    nb.cells[0].source = 'RESULTS_ROOT = "../results"\nSTEPS = 10'
    nbformat.write(nb, notebooks / "01_reads.ipynb")
    with pytest.raises(ValueError, match="does not declare SIZES_NOTE"):
        run(**kwargs, sizes="slow")


def test_a_lone_notebook_knows_which_results_it_lacks_whoever_wrote_the_rest(tmp_path, monkeypatch):
    """`missing_inputs`: what a notebook reads and is not there, from the first missing notebook on
    (a later one depends on it); a notebook run by hand, without the engine's stamp, counts as done."""
    import pytest

    from probunlearn import reproduce

    root = tmp_path / "results"
    assert reproduce.missing_inputs("05_probabilistic_evaluation.ipynb", "smoke", root) == ["01", "02", "03"]
    assert reproduce.missing_inputs("01", "smoke", root) == []
    for number in ("01", "02", "03"):  # what each leaves last, as a hand run leaves it
        marker = root / "smoke" / reproduce.FINISHED[number]
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
    assert reproduce.missing_inputs("05", "smoke", root) == []
    assert reproduce.missing_inputs("05", "cpu", root) == ["01", "02", "03"]  # another profile's folder
    assert reproduce.missing_inputs("07", "smoke", root) == ["04", "05", "06"]
    (root / "smoke" / reproduce.FINISHED["02"]).unlink()
    assert reproduce.missing_inputs("04", "smoke", root) == ["02", "03"]
    with pytest.raises(FileNotFoundError, match="02_finetune, 03_ga_baselines"):
        reproduce.ensure_inputs("04", "smoke", root, build=False)
    with pytest.raises(ValueError, match="no notebook"):
        reproduce.missing_inputs("09", "smoke", root)
    assert set(reproduce.NEEDS) == {nb.name[:2] for nb in reproduce.notebooks()}  # every notebook is listed


def test_colab_keeps_results_on_drive_when_mounted_and_nowhere_else(tmp_path, monkeypatch):
    import sys
    import types

    from probunlearn import reproduce

    assert reproduce.colab_folders("../results", "../figures") == ("../results", "../figures")  # not on Colab
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(reproduce, "DRIVE_FOLDER", tmp_path / "drive" / "MyDrive" / "probunlearn")
    monkeypatch.setattr(reproduce, "COLAB_CLONE", tmp_path / "clone")
    assert reproduce.colab_folders("../results", "../figures") == (str(tmp_path / "clone" / "results"),
                                                                  str(tmp_path / "clone" / "figures"))  # no Drive
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    assert reproduce.colab_folders("../results", "../figures")[0] == str(reproduce.DRIVE_FOLDER / "results")
    assert reproduce.colab_folders("../results", "../figures", drive=False)[0] == str(tmp_path / "clone" / "results")
