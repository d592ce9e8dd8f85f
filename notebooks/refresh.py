"""Execute the notebooks in place so they are committed with their tables and figures (`make notebooks`).

Each notebook runs top to bottom in a fresh kernel with STABILITY_SMALL=1 (seconds per job; set
STABILITY_SMALL=0 for the real settings) and its records under a temporary results root. What would
make a rerun's diff noisy is cleared: cell timings, the kernel's version, and absolute paths in
outputs (the temporary root reads ``<results>``, the checkout ``<repo>``).

    python notebooks/refresh.py [NOTEBOOK ...]
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _scrub(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


def clean(nb: nbformat.NotebookNode, replacements: dict[str, str]) -> nbformat.NotebookNode:
    """Drop what changes from run to run but says nothing: timings, versions, absolute paths."""
    nb.metadata.pop("widgets", None)
    info = nb.metadata.get("language_info")
    if info is not None:
        nb.metadata["language_info"] = {"name": info.get("name", "python")}
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            out.get("metadata", {}).pop("execution", None)
            if "text" in out:
                out["text"] = _scrub(out["text"], replacements)
            for mime, value in out.get("data", {}).items():
                if mime.startswith("text/") and isinstance(value, str):
                    out["data"][mime] = _scrub(value, replacements)
            if "traceback" in out:
                out["traceback"] = [_scrub(t, replacements) for t in out["traceback"]]
    return nb


def execute(path: Path, results: Path, small: bool = True, timeout: int = 600) -> nbformat.NotebookNode:
    """Run the notebook at ``path`` in a fresh kernel with its records under ``results``; return it executed."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {"STABILITY_SMALL": "1" if small else "0", "STABILITY_RESULTS": str(results)}
    saved = {k: os.environ.get(k) for k in (*env, "MPLBACKEND")}
    os.environ.update(env)
    os.environ.pop("MPLBACKEND", None)  # the kernel draws inline, as in Jupyter
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return clean(nb, {str(results): "<results>", str(REPO): "<repo>"})


def figures(nb: nbformat.NotebookNode) -> int:
    """How many image/png outputs the notebook holds."""
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


def errors(nb: nbformat.NotebookNode) -> list:
    """The error outputs of the notebook."""
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or sorted(HERE.glob("*.ipynb"))
    small = os.environ.get("STABILITY_SMALL", "1") == "1"
    for path in paths:
        with tempfile.TemporaryDirectory() as tmp:
            nb = execute(path, Path(tmp) / "results", small=small)
        if errors(nb):
            print(f"{path.name}: failed; left unchanged", file=sys.stderr)
            return 1
        nbformat.write(nb, path)
        print(f"{path.name}: {figures(nb)} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
