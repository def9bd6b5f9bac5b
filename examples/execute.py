"""Executes the example notebooks in place, storing their outputs (what the docs site shows).

    python examples/execute.py                 # every notebook in examples/
    python examples/execute.py quickstart.ipynb

Needs the ``notebooks`` extra (``pip install -e ".[notebooks]"``). ``tests/test_notebooks.py``
executes them again in CI and checks that the stored copies hold their outputs.
"""
from __future__ import annotations

import html
import pathlib
import re
import sys
import time

import nbclient
import nbformat

HERE = pathlib.Path(__file__).parent


def execute(path: pathlib.Path, timeout: int = 600) -> float:
    """Runs ``path`` top to bottom in a fresh kernel (working directory: ``examples/``) and
    writes it back with its outputs; returns the seconds it took."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(HERE)}}).execute()
    widgets_as_text(notebook)
    nbformat.write(notebook, path)
    return time.perf_counter() - start


def widgets_as_text(notebook) -> None:
    """Replaces each widget output (tqdm's notebook bars) by the text of its final state, so
    a saved notebook shows where the bar ended on any renderer, with no widget JavaScript."""
    state = notebook.metadata.pop("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    models = state.get("state", {})
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
            if view is not None and view["model_id"] in models:
                output["data"]["text/plain"] = widget_text(models, view["model_id"])


def widget_text(models: dict, model_id: str) -> str:
    """A box's children side by side; HTML as its text; a progress bar as 10 cells."""
    model = models[model_id]
    state = model["state"]
    if "children" in state:
        return "".join(widget_text(models, child.removeprefix("IPY_MODEL_")) for child in state["children"])
    if model["model_name"].endswith("ProgressModel"):
        filled = round(10 * (state["value"] - state["min"]) / max(state["max"] - state["min"], 1e-12))
        return "|" + "█" * filled + " " * (10 - filled) + "|"
    return html.unescape(re.sub(r"<[^>]+>", "", str(state.get("value", ""))))


def main(names: list[str]) -> None:
    paths = [HERE / n for n in names] if names else sorted(HERE.glob("*.ipynb"))
    for path in paths:
        print(f"{path.name}: {execute(path):.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
