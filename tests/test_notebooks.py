"""Every notebook runs top to bottom in FAST mode (tiny data, two epochs), for real.

Order: 04 first with no checkpoint (it must train what it needs), then 01 to 04 as a reader
would, so 04 also runs a second time and loads the checkpoint notebook 03 wrote.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import run_notebooks  # noqa: E402

import pvae_utils as pvae  # noqa: E402

FIGURES = {
    "01_data_prep.ipynb": ["mnist_samples", "mnist_class_balance", "table_tennis_frames"],
    "02_model.ipynb": ["subresolution"],
    "03_training.ipynb": ["mnist_loss_curves", "mnist_reconstructions", "table_tennis_loss_curves",
                          "table_tennis_reconstructions", "table_tennis_readback"],
    "04_interpretability.ipynb": ["mnist_traversals", "mnist_latent_correlation", "mnist_tsne",
                                  "mnist_tsne_per_partition", "table_tennis_traversals",
                                  "table_tennis_latent_correlation", "table_tennis_tsne",
                                  "table_tennis_factor_map"],
    "05_comparison.ipynb": ["comparison_factor_maps"],
}


def stdout_of(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.get("name") == "stdout")


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("PVAE_FAST", "1")
    yield
    mp.undo()


def test_committed_notebooks_carry_no_outputs():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = json.loads(path.read_text())
        assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), path.name
        assert "colab.research.google.com" in nb["cells"][0]["source"][0] + "".join(
            nb["cells"][0]["source"]), f"{path.name}: no Open in Colab badge"


def test_notebook_04_opened_first_trains_what_it_needs(fast):
    """Opening 04 first, with no checkpoint at all: it trains, says so, and saves one."""
    checkpoint = pvae.checkpoint_path("mnist")
    assert checkpoint.name == "mnist-fast.pt"  # FAST never touches the full run's checkpoint
    checkpoint.unlink(missing_ok=True)
    out = stdout_of(run_notebooks.execute(ROOT / "notebooks" / "04_interpretability.ipynb"))
    assert "No checkpoint" in out and "training 2 epochs" in out
    assert checkpoint.is_file()


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_top_to_bottom_and_saves_its_figures(fast, name):
    figures = pvae.figures_dir()
    assert figures.name == "fast"  # FAST never overwrites the committed figures
    for fig in FIGURES[name]:
        (figures / f"{fig}.png").unlink(missing_ok=True)
    out = stdout_of(run_notebooks.execute(ROOT / "notebooks" / name))
    assert "FAST mode" in out
    for fig in FIGURES[name]:
        assert (figures / f"{fig}.png").stat().st_size > 5000, fig  # a real picture, not a blank
    if name == "03_training.ipynb":
        results = json.loads((figures / "mnist_results.json").read_text())
        assert 0 < results["mnist"]["test_mse"] < 0.2 and 0 < results["pca_mse"] < 0.1
    if name == "03_training.ipynb":
        readback = json.loads((figures / "table_tennis_results.json").read_text())["readback_within_4px"]
        assert readback["inputs"]["player_y"]["within"] > 0.95   # the read-back works on real frames
    if name == "04_interpretability.ipynb":  # a finished FAST checkpoint exists by now
        assert "Loaded" in out or "No checkpoint" in out
        r2 = json.loads((figures / "table_tennis_factor_map.json").read_text())["r2"]
        assert len(r2) == 7 and len(r2[0]) == 6
    if name == "05_comparison.ipynb":
        summary = json.loads((figures / "comparison.json").read_text())["summary"]
        assert set(summary) == {"PVAE", "plain VAE", "beta-VAE", "PVAE + TC"}
        assert all(np.isfinite(summary[m]["mse"][0]) for m in summary)
        assert (figures / "comparison_pvae_traversal_p0.gif").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_running_a_notebook_twice_in_one_kernel_gives_the_same_figures(fast, name):
    """No hidden state between cells: a second Run All in the same kernel saves identical PNGs."""
    import hashlib

    import nbformat
    from nbclient import NotebookClient

    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    digests = []
    with client.setup_kernel():
        for _ in range(2):
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
            digests.append({fig: hashlib.sha256((pvae.figures_dir() / f"{fig}.png").read_bytes())
                            .hexdigest() for fig in FIGURES[name]})
    assert digests[0] == digests[1]
