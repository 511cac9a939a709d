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
    assert re.search(r"PROFILE +=  *'(smoke|demo)'", text), "the stored run's settings print no profile it stores"


def test_the_top_says_which_profile_produced_the_stored_outputs(committed):
    """The sentence at the top names the profile whose settings section 1 printed (the stored run is not GPT-2's
    unless that profile loads GPT-2)."""
    printed = re.search(r"PROFILE += '(\w+)'", json.dumps(committed)).group(1)
    top = "".join(committed["cells"][0]["source"])
    stored = re.search(r"\*\*The stored run\.\*\* The outputs below come from the `(\w+)` profile", top)
    assert stored and stored.group(1) == printed
    assert "not GPT-2" in top


def test_the_notebook_shows_the_packages_own_collate_and_training_step_on_a_toy_batch(committed):
    sources = ["".join(c["source"]) for c in _code_cells(committed)]
    assert "show_code(batches.collate)" in sources and "show_code(train.train_step)" in sources
    toy = next(s for s in sources if s.startswith("toy = "))
    assert "batches.collate(toy" in toy and "mask_prompt=True" in toy
    assert not re.search(r"^from medqa import .*\bas\b", "\n".join(sources), flags=re.M)  # `model` is the network


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
    points = metrics["evaluation"]["reference_points"]
    assert set(points) == {"random answer", "nearest question", "same template"}
    assert all(0 <= p["rougeL"]["mean"] <= 1 and p["rougeL"]["n"] == len(responses) for p in points.values())
    rows = metrics["breakdown"]
    assert {r["by"] for r in rows} == {"source", "question type"}
    assert all("ROUGE-L nearest question" in r and "ROUGE-L before" in r for r in rows)
    assert sum(r["answers"] for r in rows if r["by"] == "question type") == len(responses)
    assert metrics["settings"]["N_SAMPLES"] == 150 and metrics["settings"]["DATA_PATH"] == str(data)
    losses = [h["train_loss"] for h in metrics["history"]]
    assert losses[-1] < losses[0]
    assert (out / "loss.png").stat().st_size > 0 and (out / "model" / "config.json").exists()


def test_the_scores_cell_merges_into_evaluation_and_keeps_the_judges_results(committed):
    """update_json replaces a top-level key whole: `evaluation=` there would drop evaluation.judge (results of
    `python -m medqa.judge` recorded before a re-run)."""
    sources = "\n".join("".join(c["source"]) for c in _code_cells(committed))
    assert not re.search(r"update_json\([^)]*evaluation=", sources)
    assert 'setdefault("evaluation", {}).update(' in sources


def _index(sources, text):
    hits = [i for i, s in enumerate(sources) if text in s]
    assert len(hits) == 1, f"{len(hits)} code cells hold {text!r}"
    return hits[0]


def test_the_notebook_shows_the_loss_on_toy_numbers_and_the_first_loss(committed):
    sources = ["".join(c["source"]) for c in _code_cells(committed)]
    toy = sources[_index(sources, "ignore_index=-100")]
    assert "-100" in toy.split("targets = ", 1)[1].split("\n")[0] and "log_softmax" in toy and ".mean()" in toy
    first = _index(sources, "readings.first_loss(")
    assert "train.mean_loss(" in sources[first] and first < _index(sources, "history = train.train(")


def test_the_notebook_runs_a_greedy_loop_and_checks_it_against_the_batched_path(committed):
    sources = ["".join(c["source"]) for c in _code_cells(committed)]
    shown = _index(sources, "show_code(greedy.greedy_tokens)")
    loop = _index(sources, "greedy.greedy_tokens(model,")
    check = _index(sources, "batched == made")
    assert shown < loop < check and "repetition_penalty=1.0" in sources[check]
    assert "generate.generate_ids(" in sources[check]


def test_answers_are_printed_whole_and_each_result_has_a_reading_under_it(committed):
    sources = ["".join(c["source"]) for c in _code_cells(committed)]
    assert not [s for s in sources if re.search(r"\.str\[:|\[:\d+\]\)?\s*for a in", s)], "answers cut short"
    assert 'pd.set_option("display.max_colwidth", None)' in sources[_index(sources, "import inspect")]
    assert _index(sources, "readings.print_answers(records[:3])") == _index(sources, "records = generate.response_"
                                                                                      "records(test_set.frame, answers)")
    assert _index(sources, "readings.loss_curve(history)") == _index(sources, "train.plot_losses(") + 1
    assert _index(sources, "readings.verdict(after, reference)") == _index(sources, "evaluate.compare(") + 1
    assert "readings.with_scale" in sources[_index(sources, "evaluate.compare(")]
    assert _index(sources, "readings.empty_answers(") == _index(sources, "if cfg.BASELINE_EVAL:") + 1


def test_the_stored_run_prints_three_test_answers_whole(committed):
    cell = next(c for c in _code_cells(committed) if "readings.print_answers(records[:3])" in "".join(c["source"]))
    printed = "".join("".join(o.get("text", "")) for o in cell["outputs"])
    assert len(re.findall(r"^   expected ", printed, flags=re.M)) == 3, "store the notebook from a run"
    assert len(re.findall(r"^   model ", printed, flags=re.M)) == 3
