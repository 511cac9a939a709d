"""The notebook's first cell (tagged `colab`) fetches the project and installs what Colab lacks, but only inside
Google Colab, and never replaces Colab's own torch; anywhere else it does nothing."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "llm.ipynb"
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"


def colab_cell() -> str:
    cells = [c for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
             if "colab" in c.get("metadata", {}).get("tags", [])]
    assert cells, "llm.ipynb has no cell tagged 'colab' (the notebook's first code cell)"
    return "".join(cells[0]["source"])


@pytest.fixture
def commands(monkeypatch, tmp_path):
    """subprocess.run recorded instead of run; a `git clone` makes the folder it would make."""
    ran = []

    def fake_run(cmd, check=False, **kw):
        ran.append(list(cmd))
        if cmd[:2] == ["git", "clone"]:
            (tmp_path / cmd[-1]).mkdir()
            (tmp_path / cmd[-1] / "requirements.txt").write_text(REQUIREMENTS.read_text())
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return ran


def test_outside_colab_the_cell_does_nothing(commands, tmp_path):
    source = colab_cell()
    assert "google.colab" not in sys.modules
    path_before = list(sys.path)
    exec(compile(source, "colab-cell", "exec"), {})
    assert commands == [] and Path.cwd() == tmp_path and sys.path == path_before
    assert list(tmp_path.iterdir()) == []


def test_inside_colab_it_clones_and_installs_everything_but_torch(commands, tmp_path, monkeypatch):
    source = colab_cell()
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(compile(source, "colab-cell", "exec"), {})
    clone, install = commands
    assert clone[:2] == ["git", "clone"] and clone[-1] == "medqa-project"
    assert install[:4] == [sys.executable, "-m", "pip", "install"]
    packages = [a for a in install[4:] if not a.startswith("-")]
    assert "transformers==5.23.0" in packages and "tiktoken==0.14.0" in packages
    assert not any(p.split("=")[0] in ("torch", "jupyter") for p in packages)  # Colab's CUDA torch stays
    assert Path.cwd() == tmp_path / "medqa-project" and str(Path.cwd()) in sys.path
    # run again (Colab's "run all" after a restart): no second clone
    monkeypatch.chdir(tmp_path)
    commands.clear()
    exec(compile(source, "colab-cell", "exec"), {})
    assert [c[0] for c in commands] == [sys.executable]
