"""The course exercises (probunlearn.exercises, `make exercises`): the student copies parse, carry
stubs instead of the solutions, and their check cells fail on the stubs and pass on the solutions."""

import json

import nbformat
import pytest

from conftest import NOTEBOOKS
from probunlearn.exercises import BEGIN, END, exercises_of, stub_source, student_notebook, write_exercises


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    out = tmp_path_factory.mktemp("exercises")
    return {path.name: path for path in write_exercises(NOTEBOOKS[0].parent, out)}


def run(cell, namespace):
    exec(compile("".join(cell["source"]), "<cell>", "exec"), namespace)


def test_student_copies_parse_and_carry_stubs(copies):
    assert sorted(copies) == sorted(nb.name for nb in NOTEBOOKS)
    total = 0
    for notebook in NOTEBOOKS:
        solution = json.loads(notebook.read_text())
        copy = nbformat.read(copies[notebook.name], as_version=4)
        nbformat.validate(copy)
        text = copies[notebook.name].read_text()
        assert BEGIN not in text and END not in text
        pairs = exercises_of(json.loads(text))
        assert len(pairs) == len(exercises_of(solution))
        for (exercise, _), (original, _) in zip(pairs, exercises_of(solution)):
            regions = "".join(original["source"]).count(BEGIN)
            assert "".join(exercise["source"]).count("raise NotImplementedError") == regions  # one stub per region
            total += regions
        assert all(not c.get("outputs") for c in copy.cells if c.cell_type == "code")
    assert total >= 5  # the GA sign, mixing, the entropy term, the Clopper-Pearson bound, Extraction Strength


def test_check_cells_pass_on_solutions_and_fail_on_stubs(copies, capsys):
    for notebook in NOTEBOOKS:
        solution = exercises_of(json.loads(notebook.read_text()))
        student = exercises_of(json.loads(copies[notebook.name].read_text()))
        for (exercise, check), (stubbed, student_check) in zip(solution, student):
            namespace = {}
            run(exercise, namespace)
            run(check, namespace)
            assert "✓" in capsys.readouterr().out
            namespace = {}
            run(stubbed, namespace)  # defining the stubbed function works
            with pytest.raises(AssertionError, match="not done yet"):
                run(student_check, namespace)


def test_stubs_keep_the_indentation_and_refuse_broken_markers():
    source = f"def f(x):\n    {BEGIN}\n    return x\n    {END}\n"
    stubbed = stub_source(source)
    assert "return x" not in stubbed and "    raise NotImplementedError" in stubbed
    namespace = {}
    exec(stubbed, namespace)
    with pytest.raises(NotImplementedError):
        namespace["f"](1)
    with pytest.raises(ValueError):
        stub_source(f"{BEGIN}\nx = 1\n")
    untagged = {"cells": [{"cell_type": "code", "metadata": {}, "source": [f"{BEGIN}\n", "x = 1\n", f"{END}\n"],
                           "outputs": [], "execution_count": None}]}
    with pytest.raises(ValueError, match="not tagged"):
        student_notebook(untagged)
