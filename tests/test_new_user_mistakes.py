"""Mistakes a new user makes that an earlier round of tries found unguarded: each gets one clear MedQAError (or,
for the commands, one error line and exit status 2), and no file the user had is deleted or changed."""

import json
import os
from pathlib import Path

import pytest

from medqa import ask, data, judge, model as gpt, settings
from medqa.errors import MedQAError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Path(gpt.model_source("tiny", 0, cache_dir=tmp_path_factory.mktemp("cache")))


def resolve(**params):
    return settings.resolve({"PROFILE": "smoke", **params}, env={})


def copy_model(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for p in src.iterdir():
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


def test_overwrite_never_deletes_the_model_or_data_the_run_uses(tiny, tmp_path):
    out = tmp_path / "mywork"
    model = copy_model(tiny, out / "model")  # the user's model, where a run keeps its saved model
    s = resolve(MODEL=str(model), OUTPUT_DIR=str(out), OVERWRITE=True)
    with pytest.raises(MedQAError, match="no run.json.*OVERWRITE=True does not delete them"):
        settings.claim_output_dir(s, model_source=str(model))
    (out / "run.json").write_text("{}")  # even beside a run of ours, the run's own inputs stay
    with pytest.raises(MedQAError, match=r"MODEL=.*lies inside OUTPUT_DIR.*would delete it"):
        settings.claim_output_dir(s, model_source=str(model))
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny.iterdir())


def test_output_dir_may_not_be_the_model_folder(tiny, tmp_path):
    model = copy_model(tiny, tmp_path / "m")
    with pytest.raises(MedQAError, match="is the MODEL folder"):
        resolve(MODEL=str(model), OUTPUT_DIR=str(model))
    with pytest.raises(MedQAError, match="is the MODEL folder"):
        resolve(MODEL=str(model), OUTPUT_DIR=str(model / "run"))


def test_a_tilde_means_the_home_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    copy_model(tiny, tmp_path / "my-model")
    s = resolve(MODEL="~/my-model", OUTPUT_DIR="~/runs/mine")
    assert (s.MODEL, s.OUTPUT_DIR) == (str(tmp_path / "my-model"), str(tmp_path / "runs" / "mine"))


@pytest.mark.parametrize("name, value, words", [
    ("OUTPUT_DIR", "runs\x00x", "NUL"), ("OUTPUT_DIR", "a" * 5000, "cannot be a folder"),
    ("JUDGE_MODEL", "", "is empty"), ("OLLAMA_HOST", "", "is empty"), ("MODEL", " ", "is empty")])
def test_impossible_or_empty_settings(name, value, words):
    with pytest.raises(MedQAError, match=words):
        resolve(**{name: value})


def test_a_csv_whose_rows_are_wider_than_its_header_is_refused(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("question,answer\n" + "".join(f"q{i}?,a{i},\n" for i in range(50)))  # a spreadsheet's commas
    with pytest.raises(MedQAError, match="row 2 has 3 fields but the header names 2"):
        data.read_table(path)


def test_a_csv_holding_only_a_byte_order_mark_is_empty(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("\ufeff \n", encoding="utf-8")
    with pytest.raises(MedQAError, match="is empty"):
        data.read_table(path)


def test_ask_with_a_folder_for_questions_or_a_damaged_generation_config(tiny, tmp_path, capsys):
    (tmp_path / "qdir").mkdir()
    assert ask.main(["--model", str(tiny), "--file", str(tmp_path / "qdir")]) == 2
    assert "--file" in capsys.readouterr().err
    for content in ("[1]", '{"max_new_tokens": "many"}'):
        model = copy_model(tiny, tmp_path / f"m{len(content)}")
        (model / "generation_config.json").write_text(content)
        assert ask.main(["--model", str(model), "What is gout?"]) == 2
        assert "generation_config.json" in capsys.readouterr().err
    for flag in ("--temperature", "--repetition-penalty"):
        assert ask.main(["--model", str(tiny), flag, "inf", "What is gout?"]) == 2
        assert "finite" in capsys.readouterr().err


def test_judge_with_a_folder_for_metrics_or_a_budget_that_is_not_a_number(tmp_path, capsys):
    answers = tmp_path / "test_responses.json"
    answers.write_text(json.dumps([{"instruction": "q?", "input": "", "output": "a", "model_response": "b"}]))
    (tmp_path / "metrics.json").mkdir()
    assert judge.main([str(answers), "--host", "http://127.0.0.1:9"]) == 2
    assert "metrics.json" in capsys.readouterr().err
    os.rmdir(tmp_path / "metrics.json")
    with pytest.raises(SystemExit) as stop:  # argparse's own error line and status
        judge.main([str(answers), "--host", "http://127.0.0.1:9", "--budget-s", "nan"])
    assert stop.value.code == 2 and "--budget-s" in capsys.readouterr().err
