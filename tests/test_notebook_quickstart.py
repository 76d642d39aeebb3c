"""notebooks/quickstart.ipynb runs headless on a finished tiny run."""
from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from helpers_train import tiny_run

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes_on_a_tiny_run(monkeypatch, tmp_path):
    run = tiny_run()
    monkeypatch.setenv("ACIP_RUN_DIR", str(run))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "ratio 0.8: measured" in text and "ratio 0.5: measured" in text and "And God said" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert "size ratio 0.5" in text or "size ratio 0.49" in text
