"""Exercise versions of the notebooks, for a course (`make exercises`).

In the notebooks, a code cell that teaches a formula or a step is tagged `exercise` and marks its
solution with nbgrader's markers, the convention teachers know:

    def m_bin(k, n, alpha):
        ### BEGIN SOLUTION
        return ...
        ### END SOLUTION

The cell right after it is tagged `exercise-check`: it calls `check(...)`, which compares the
student's function with the library's on a few cases and says whether they match. The notebooks
run with their solutions in CI, so every check cell is tested to pass there.

`write_exercises(notebooks, exercises)` writes the student copies: every notebook, outputs
stripped, each solution region replaced by a stub that raises `NotImplementedError` (with the
region's indentation, as nbgrader's `# YOUR CODE HERE` stub), the check cells kept. On a stub a
check cell fails with a message that says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
EXERCISE_TAG, CHECK_TAG = "exercise", "exercise-check"
STUB = "# YOUR CODE HERE\nraise NotImplementedError(\"exercise: replace this line with your solution\")"


def check(name: str, student: Callable[[], object], expected, *, atol: float = 1e-6) -> bool:
    """Run `student()` (a student's computation, as a zero-argument function) and compare it with
    `expected` (numbers, arrays or tensors; to `atol`). Prints a tick when they match; raises an
    `AssertionError` that says what differs, or that the exercise is not done yet."""
    try:
        got = student()
    except NotImplementedError as err:
        raise AssertionError(f"✗ {name}: not done yet (the exercise cell above still raises NotImplementedError)") from err
    got_array, expected_array = (np.asarray(_plain(v), dtype=float) for v in (got, expected))
    if got_array.shape != expected_array.shape or not np.allclose(got_array, expected_array, atol=atol, rtol=0):
        raise AssertionError(f"✗ {name}: got {np.round(got_array, 6).tolist()}, expected {np.round(expected_array, 6).tolist()}")
    print(f"✓ {name}: matches probunlearn's own computation")
    return True


def _plain(value):
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().numpy()
    return value


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def stub_source(source: str) -> str:
    """`source` with each BEGIN/END SOLUTION region replaced by the stub, at the region's indentation."""
    lines, out, inside = source.splitlines(), [], False
    for line in lines:
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError("nested ### BEGIN SOLUTION")
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(indent + stub for stub in STUB.splitlines())
        elif stripped == END:
            if not inside:
                raise ValueError("### END SOLUTION without ### BEGIN SOLUTION")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError("### BEGIN SOLUTION without ### END SOLUTION")
    return "\n".join(out)


def student_notebook(notebook: dict) -> dict:
    """The student copy of a notebook (as loaded JSON): outputs stripped, solutions stubbed."""
    notebook = json.loads(json.dumps(notebook))
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code":
            continue
        cell["outputs"], cell["execution_count"] = [], None
        source = "".join(cell["source"])
        if BEGIN in source:
            if EXERCISE_TAG not in _tags(cell):
                raise ValueError(f"a cell with {BEGIN} is not tagged {EXERCISE_TAG!r}: {source[:80]!r}")
            cell["source"] = stub_source(source).splitlines(keepends=True)
    return notebook


def exercises_of(notebook: dict) -> list[tuple[dict, dict]]:
    """(exercise cell, its check cell) pairs of a notebook; raises if an exercise has no check right after it."""
    cells, pairs = notebook["cells"], []
    for i, cell in enumerate(cells):
        if EXERCISE_TAG in _tags(cell):
            following = cells[i + 1] if i + 1 < len(cells) else None
            if following is None or CHECK_TAG not in _tags(following):
                raise ValueError(f"exercise cell {i} has no {CHECK_TAG!r} cell right after it")
            pairs.append((cell, following))
    return pairs


def write_exercises(notebooks: Path, exercises: Path) -> list[Path]:
    """Write the student copy of every numbered notebook of `notebooks` into `exercises`."""
    exercises.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(Path(notebooks).glob("[0-9][0-9]_*.ipynb")):
        notebook = json.loads(path.read_text())
        exercises_of(notebook)  # every exercise has its check
        target = exercises / path.name
        target.write_text(json.dumps(student_notebook(notebook), indent=1, ensure_ascii=False) + "\n")
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the student copies of the notebooks.")
    parser.add_argument("notebooks", type=Path, nargs="?", default=Path("notebooks"))
    parser.add_argument("exercises", type=Path, nargs="?", default=Path("exercises"))
    args = parser.parse_args(argv)
    for path in write_exercises(args.notebooks, args.exercises):
        count = len(exercises_of(json.loads(path.read_text())))
        print(f"{path}: {count} exercise{'s' if count != 1 else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
