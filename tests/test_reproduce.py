"""`make reproduce` resumes: a finished notebook is skipped while its notebook, settings, package code
and upstream notebooks are unchanged, and rerun (with everything after it) when one changes."""

import json

import nbformat

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
