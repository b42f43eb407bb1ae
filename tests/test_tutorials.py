"""Every tutorial notebook runs top to bottom on numpy and on the guard backend (its assert cells are the checks)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import require_data

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the [test] extra (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the [test] extra (nbclient)")

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))


def test_tutorials_exist():
    assert len(TUTORIALS) >= 1, "no tutorial notebooks found in tutorials/"


@pytest.mark.slow
@pytest.mark.backends("numpy", "guard")  # tutorial 02 measures memory with tracemalloc, which sees host memory only
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, array_backend, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    if any("load_dataset" in c.source for c in nb.cells if c.cell_type == "code"):
        require_data()  # a notebook that reads MNIST/FashionMNIST: the real-data rule (before CI is set below)
    monkeypatch.setenv("CI", os.environ.get("CI", "true"))  # tutorials shrink their sizes under CI
    monkeypatch.setenv("MINILAE_BACKEND", array_backend)  # the kernel computes on the test's backend
    monkeypatch.setenv("MPLBACKEND", "Agg")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
