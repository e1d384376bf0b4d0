"""Execute the numbered notebooks headless, in order, and report where their figures went.

    python tools/run_notebooks.py               # all of notebooks/0*.ipynb, full configuration
    PVAE_FAST=1 python tools/run_notebooks.py   # smoke run: tiny data, figures in figures/fast/

Executed copies (with outputs) go to build/notebooks/, which git ignores; the notebooks in
notebooks/ stay without outputs. Any cell error stops the run with a non-zero exit status.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build" / "notebooks"


def execute(path: Path, timeout: int = 3600) -> nbformat.NotebookNode:
    """Run every cell of the notebook at ``path`` in a fresh kernel, from the notebooks folder.
    The kernel inherits this process's environment (so PVAE_FAST reaches it). Raises
    nbclient's CellExecutionError on the first failing cell."""
    nb = nbformat.read(path, as_version=4)
    # The kernel process's own stderr carries only jupyter's start-up chatter (a TCP transport
    # warning); what cells print, errors included, comes back through the notebook protocol.
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute(
                       stderr=subprocess.DEVNULL)
    BUILD.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, BUILD / path.name)
    return nb


def main(names: list[str]) -> None:
    paths = [NOTEBOOKS / n for n in names] if names else sorted(NOTEBOOKS.glob("0*.ipynb"))
    total = time.perf_counter()
    for path in paths:
        start = time.perf_counter()
        print(f"running {path.relative_to(ROOT)} ...", flush=True)
        execute(path)
        print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)
    sys.path.insert(0, str(ROOT))
    import pvae_utils
    print(f"All {len(paths)} notebooks ran in {time.perf_counter() - total:.0f} s.")
    print(f"Figures: {pvae_utils.figures_dir()}   executed notebooks: {BUILD}")


if __name__ == "__main__":
    main(sys.argv[1:])
