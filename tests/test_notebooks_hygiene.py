"""Notebook hygiene (STYLE.md): outputs stripped, a tagged parameters cell of literals that papermill
can read in full, defaults equal to the cpu profile, and no notebook edits sys.path."""

import ast
import json

import papermill as pm
import pytest

from conftest import NOTEBOOKS
from probunlearn.utils import load_profile

CPU = load_profile("cpu")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_its_parameters_are_readable(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, "strip outputs (make strip)"
            assert "sys.path" not in "".join(cell["source"]), "notebooks import the installed package"
    tagged = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1
    source = "".join(tagged[0]["source"])
    assigned = {}
    for node in ast.parse(source).body:
        assert isinstance(node, ast.Assign), "the parameters cell holds assignments only"
        assigned[node.targets[0].id] = ast.literal_eval(node.value)  # literals only
    # papermill must see every name, or the profile's value would silently not be injected
    assert set(pm.inspect_notebook(str(notebook))) == set(assigned)
    # defaults are the cpu profile, so a notebook run by hand (or on Colab) matches `make reproduce`
    for name, value in assigned.items():
        if name in CPU:
            assert value == CPU[name], (name, value, CPU[name])


def test_every_colab_cell_and_badge_uses_the_one_repository_address():
    """pyproject.toml's [project.urls] Repository is the one place for the address
    (`python -m probunlearn.repository --set URL` rewrites the rest)."""
    import re

    from conftest import ROOT
    from probunlearn.repository import address, colab_link, install_cell, is_install_cell

    url = address()
    assert re.fullmatch(r"https://github\.com/[^/]+/[^/]+", url)
    for notebook in NOTEBOOKS:
        cells = [c for c in json.loads(notebook.read_text())["cells"] if is_install_cell(c)]
        assert len(cells) == 1 and "".join(cells[0]["source"]) == install_cell(url), notebook.name
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"https://colab\.research\.google\.com/github/[^)\s]+", readme)
    assert sorted(links) == sorted(colab_link(url, nb.name) for nb in NOTEBOOKS)  # one badge per notebook, no stale one


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_notebook_that_reads_a_slow_cpu_size_prints_the_note_that_says_it_was_changed(notebook):
    """`reproduce` replaces the cpu profile's SLOW_CPU_SIZES on a slow CPU; a notebook reading one of
    them must declare SIZES_NOTE and print it, so that its output says it ran smaller sizes."""
    declared = set(pm.inspect_notebook(str(notebook)))
    if not declared & set(CPU["SLOW_CPU_SIZES"]):
        assert "SIZES_NOTE" not in declared
        return
    assert "SIZES_NOTE" in declared
    code = [c for c in json.loads(notebook.read_text())["cells"]
            if c["cell_type"] == "code" and "parameters" not in c["metadata"].get("tags", [])]
    assert any("print(SIZES_NOTE)" in "".join(c["source"]) for c in code)
