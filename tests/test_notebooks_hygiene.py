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
