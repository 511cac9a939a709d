"""Every bad input ends with one MedQAError that names the problem and the fix, and changes no file."""

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from medqa import batches, data, prompts, settings
from medqa.errors import MedQAError
from tests.sample_data import write_sample_csv


def snapshot(*folders):
    """Every file under the folders with a hash of its content."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working folder with a data/ copy and a finished run in OUTPUT_DIR, to check that nothing changes."""
    monkeypatch.chdir(tmp_path)
    write_sample_csv(tmp_path / "data" / "medquad.csv")
    (tmp_path / "runs" / "smoke").mkdir(parents=True)
    (tmp_path / "runs" / "smoke" / "metrics.json").write_text('{"history": []}')
    before = snapshot(tmp_path / "data", tmp_path / "runs")
    yield tmp_path
    assert snapshot(tmp_path / "data", tmp_path / "runs") == before


def fails(path_or_call, *words):
    with pytest.raises(MedQAError) as err:
        path_or_call() if callable(path_or_call) else data.read_table(path_or_call)
    message = str(err.value)
    for w in words:
        assert w in message, f"{w!r} not in: {message}"
    return message


def write(path, content, mode="w"):
    path = Path(path)
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------- the file itself

def test_missing_file(project):
    fails(project / "nope.csv", "nope.csv", "does not exist", "unset DATA_PATH")


def test_folder(project):
    fails(project / "data", "is a folder", "medquad.csv")


def test_unknown_extension(project):
    fails(write(project / "m.xlsx", "x"), "'.xlsx'", ".csv", ".json")


def test_empty_file(project):
    fails(write(project / "e.csv", ""), "e.csv", "is empty")


def test_csv_with_only_a_header(project):
    fails(write(project / "h.csv", "question,answer,source,focus_area\n"), "header but no rows")


def test_csv_without_question_and_answer_columns(project):
    msg = fails(write(project / "c.csv", "q,a\nWhat?,That.\n"), "['question', 'answer']", "['q', 'a']")
    assert "Rename" in msg


def test_csv_whose_answers_are_all_blank(project):
    fails(write(project / "b.csv", 'question,answer\n"What is gout ?","  "\n"Why?",""\n'), "every answer is empty")


def test_csv_with_a_broken_quote(project):
    fails(write(project / "q.csv", 'question,answer\n"What is gout ?,"An arthritis.\nWhy?,Because.\n'),
          "not a well-formed CSV", "unclosed double quote")


def test_file_that_is_not_utf8(project):
    msg = fails(write(project / "l.csv", "question,answer\nWhat is Ménière's disease ?,An ear disorder.\n".encode("cp1252")),
                "not UTF-8", "iconv -f cp1252")
    assert "DATA_PATH" in msg


def test_json_that_does_not_parse_says_where(project):
    fails(write(project / "j.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]'),
          "not valid JSON", "line 2")
    fails(write(project / "j.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n'),
          "not valid JSON Lines", "line 2")


def test_alpaca_records_without_instruction_or_output(project):
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"output": "d"}, {"instruction": "e", "output": "f"}]
    fails(write(project / "r.json", json.dumps(records)), "2 of 4 records", "record 1", "`instruction` or `output`")


# ---------------------------------------------------------------- settings

def resolve(**params):
    return settings.resolve({"PROFILE": "smoke", **params}, env={})


def test_unknown_profile_lists_the_valid_ones(project):
    fails(lambda: resolve(PROFILE="fast"), "PROFILE='fast'", "['cpu', 'full', 'smoke']")


def test_unknown_model_lists_the_valid_ones(project):
    fails(lambda: resolve(MODEL="gpt3"), "MODEL='gpt3'", "gpt2-medium", "save_pretrained")


@pytest.mark.parametrize("name,value", [("BATCH_SIZE", 0), ("EPOCHS", -1), ("LEARNING_RATE", 0.0),
                                        ("LEARNING_RATE", -1e-4), ("BATCH_SIZE", 2.5)])
def test_not_positive(project, name, value):
    fails(lambda: resolve(**{name: value}), f"{name}={value!r}")


def test_max_length_too_short_for_any_prompt(project, tokenizer):
    fails(lambda: resolve(MAX_LENGTH=16), "MAX_LENGTH=16", "too short")
    df = batches.encode_examples(data.read_table(project / "data" / "medquad.csv"), tokenizer)
    fails(lambda: batches.QADataset(df, 30), "MAX_LENGTH=30", "too short for any prompt")


def test_max_length_above_the_models_context(project, tiny_model):
    from medqa.model import check_fits

    fails(lambda: check_fits(4096, tiny_model), "MAX_LENGTH=4096", "context of 1024", "at most 1024")


def test_split_that_leaves_validation_or_test_empty(project):
    fails(lambda: resolve(VAL_FRACTION=0.0), "VAL_FRACTION=0.0")
    fails(lambda: resolve(VAL_FRACTION=0.6, TEST_FRACTION=0.5), "leaves no training data")
    two = pd.DataFrame({"instruction": ["q1", "q2"], "input": "", "output": "a"})
    fails(lambda: prompts.split_by_question(two, 0.1, 0.05, 0), "set empty", "N_SAMPLES")


def test_too_many_samples_uses_all_with_a_note(project):
    df = data.read_table(project / "data" / "medquad.csv")
    notes = []
    assert len(data.sample_rows(df, 10**6, 0, log=notes.append)) == len(df)
    assert "1000000" in notes[0] and "using all" in notes[0]
