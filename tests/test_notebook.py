"""The committed notebook is a clean top-to-bottom run, and it runs headless on Alpaca JSON too.

(nbval, configured in pytest.ini and conftest.py, separately re-runs llm.ipynb on MedQuAD CSV.)
"""

import json
import os
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "llm.ipynb"


@pytest.fixture(scope="module")
def committed():
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def test_one_parameters_cell_holds_every_setting_and_only_colabs_setup_comes_before_it(committed):
    from medqa.settings import Settings

    cells = _code_cells(committed)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", [])]
    assert tagged == [1] and "colab" in cells[0]["metadata"].get("tags", [])
    names = set(re.findall(r"^([A-Z_]+) = ", "".join(cells[1]["source"]), flags=re.M))
    assert names == set(Settings.__dataclass_fields__)


def test_committed_notebook_is_one_complete_run(committed):
    cells = _code_cells(committed)
    assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1))
    assert not [o for c in cells for o in c["outputs"] if o["output_type"] == "error"]
    text = json.dumps(committed)
    assert not re.search(r"/work/|/root/|/home/|/tmp/[A-Za-z0-9_]|[A-Z]:\\\\", text), "machine paths in outputs"
    assert "PROFILE            = 'smoke'" in text  # the stored outputs say which settings produced them


def test_stored_progress_bars_hold_only_their_final_state(committed):
    """Each flush of a progress bar is an output of its own, each redrawing the bar after a carriage return: stored
    as run, every renderer (nbconvert, GitHub) shows every redraw as a line of its own. After the run, merge them
    (jupyter nbconvert --to notebook --inplace --CoalesceStreamsPreprocessor.enabled=True llm.ipynb)."""
    for i, cell in enumerate(_code_cells(committed), 1):
        outputs = cell["outputs"]
        for a, b in zip(outputs, outputs[1:]):
            assert not (a["output_type"] == b["output_type"] == "stream" and a["name"] == b["name"]), \
                f"code cell {i} stores consecutive {a['name']} outputs: coalesce the notebook's streams"
        for out in outputs:
            if out["output_type"] == "stream":
                text = "".join(out["text"])
                assert not re.search(r"\r[^\n]", text), \
                    f"code cell {i} stores a redrawn line: {text[text.index(chr(13)):][:60]!r}"


def test_notebook_runs_headless_on_alpaca_json_with_papermill(tmp_path):
    import papermill

    from tests.sample_data import write_sample_alpaca_json

    data = write_sample_alpaca_json(tmp_path / "alpaca.json")
    out = tmp_path / "run"
    papermill.execute_notebook(str(NOTEBOOK), str(tmp_path / "executed.ipynb"), cwd=str(NOTEBOOK.parent),
                               parameters={"PROFILE": "smoke", "DATA_PATH": str(data), "OUTPUT_DIR": str(out),
                                           "N_SAMPLES": 150},
                               progress_bar=False, kernel_name="python3")
    responses = json.loads((out / "test_responses.json").read_text())
    assert responses and all({"instruction", "input", "output", "model_response"} <= set(r) for r in responses)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["N_SAMPLES"] == 150 and metrics["settings"]["DATA_PATH"] == str(data)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert (out / "loss.png").stat().st_size > 0 and (out / "model" / "config.json").exists()
