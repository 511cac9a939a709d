"""Every bad input ends with one MedQAError that names the problem and the fix, and changes no file."""

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from medqa import batches, data, settings, split
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
    fails(lambda: resolve(PROFILE="fast"), "PROFILE='fast'", "['cpu', 'demo', 'full', 'smoke']")


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
    from medqa.model import check_max_length

    fails(lambda: check_max_length(4096, tiny_model), "MAX_LENGTH=4096", "context of 1024", "at most 1024")


def test_split_that_leaves_validation_or_test_empty(project):
    fails(lambda: resolve(VAL_FRACTION=0.0), "VAL_FRACTION=0.0")
    fails(lambda: resolve(VAL_FRACTION=0.6, TEST_FRACTION=0.5), "leaves no training data")
    two = pd.DataFrame({"instruction": ["q1", "q2"], "input": "", "output": "a"})
    fails(lambda: split.split_by_question(two, 0.1, 0.05, 0), "too few examples", "N_SAMPLES")


def test_too_many_samples_uses_all_with_a_note(project):
    df = data.read_table(project / "data" / "medquad.csv")
    notes = []
    assert len(data.sample_rows(df, 10**6, 0, log=notes.append)) == len(df)
    assert "1000000" in notes[0] and "using all" in notes[0]


# ---------------------------------------------------------------- what the file really is (by content)

def test_compressed_files_and_workbooks_named_csv_are_named_as_what_they_are(project):
    import gzip
    import io
    import zipfile

    csv_bytes = (project / "data" / "medquad.csv").read_bytes()
    fails(write(project / "g.csv", gzip.compress(csv_bytes)), "g.csv", "gzip-compressed", "gunzip -k g.csv")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
    fails(write(project / "x.csv", buf.getvalue()), "x.csv", "Excel workbook (.xlsx)", "CSV UTF-8")
    fails(write(project / "x.xlsx", buf.getvalue()), "Excel workbook (.xlsx)")  # not just "extension not read"
    fails(write(project / "o.csv", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600)), "legacy Excel", "CSV UTF-8")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("medquad.csv", csv_bytes)
    fails(write(project / "z.csv", buf.getvalue()), "zip archive (medquad.csv)", "unpack it")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])  # with a BOM, and without one
def test_utf16_text_is_named_with_the_conversion(project, encoding):
    text = "question\tanswer\nWhat is gout ?\tAn arthritis.\n"
    msg = fails(write(project / "u.csv", text.encode(encoding)), "u.csv", "UTF-16", "iconv -f UTF-16 -t UTF-8")
    assert "cp1252" not in msg  # the old advice turned UTF-16 into garbage


@pytest.mark.parametrize("sep,name", [(";", "semicolon"), ("\t", "tab"), ("|", "pipe")])
def test_csv_with_another_separator_names_it(project, sep, name):
    text = f"question{sep}answer{sep}source\nWhat is gout, really ?{sep}An arthritis.{sep}GARD\n"
    fails(write(project / "s.csv", text), "s.csv", f"{name}-separated", "comma delimited", f"sep={sep!r}")


def test_json_under_the_other_json_extension_is_named(project):
    records = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    lines = "\n".join(json.dumps(r) for r in records) + "\n"
    fails(write(project / "l.json", lines), "l.json", "JSON Lines", "rename it to l.jsonl")
    fails(write(project / "j.jsonl", json.dumps(records, indent=1)), "j.jsonl", "one JSON document",
          "rename it to j.json")
    fails(write(project / "c.json", "question,answer\nWhat?,That.\n"), "a CSV", "rename it to c.csv")
    fails(write(project / "j.csv", json.dumps(records)), "j.csv", "one JSON document", "rename it to j.json")


def test_a_file_with_another_extension_is_told_what_it_looks_like(project):
    fails(write(project / "m.txt", "question,answer\nWhat?,That.\n"), "'.txt'", "looks like a CSV", "end in .csv")


def test_one_very_long_answer_is_read(project):
    long_answer = "Gout is an arthritis. " * 12_000  # 264,000 characters, over the csv module's 131,072
    path = write(project / "long.csv", f'question,answer\n"What is gout ?","{long_answer}"\nWhy?,Because.\n')
    df = data.read_table(path)
    assert df["output"].iloc[0] == long_answer and len(df) == 2


def test_a_csv_with_a_bom_and_crlf_line_ends_is_read(project):
    path = write(project / "w.csv", "\ufeffQuestion,Answer\r\nWhat is gout ?,An arthritis.\r\nWhy?,Because.\r\n")
    df = data.read_table(path)
    assert list(df["instruction"]) == ["What is gout ?", "Why?"] and list(df["output"]) == ["An arthritis.", "Because."]


def test_an_empty_question_column_is_refused(project):
    fails(write(project / "nq.csv", 'question,answer\n"",An arthritis.\n" ",Because.\n'),
          "nq.csv", "every question is empty")


def test_duplicate_column_names_after_case_and_spaces_are_named(project):
    fails(write(project / "d.csv", "Question,answer, question \nWhat?,That.,Again?\n"), "d.csv", "['question']",
          "more than once")
    fails(write(project / "d2.csv", "question,answer,answer\nWhat?,That.,This.\n"), "['answer']", "more than once")


@pytest.mark.parametrize("value,kind", [(42, "a number"), (["a", "b"], "a list"), (None, "null"),
                                        ({"text": "a"}, "an object"), (True, "true/false")])
def test_alpaca_fields_that_are_not_text_are_refused(project, value, kind):
    records = [{"instruction": "q0", "input": "", "output": "a0"}, {"instruction": "q1", "input": "", "output": value}]
    for name, text in (("n.json", json.dumps(records)), ("n.jsonl", "\n".join(json.dumps(r) for r in records))):
        fails(write(project / name, text), name, "`output` of record 1", kind, "must be strings")
    records[1] = {"instruction": "q1", "input": None, "output": "a1"}
    fails(write(project / "i.json", json.dumps(records)), "`input` of record 1", "null")


def test_json_that_holds_no_list_of_records_says_what_it_holds(project):
    fails(write(project / "e.json", "[]"), "e.json", "an empty list")
    fails(write(project / "o.json", json.dumps({"data": [{"instruction": "q", "output": "a"}]})),
          "one JSON object, not a list", "under 'data'")
    fails(write(project / "s.json", '"just text"'), "a JSON str")


def test_too_few_examples_for_the_split_names_the_minimum(project):
    three = data.read_table(project / "data" / "medquad.csv").head(3)
    msg = fails(lambda: data.check_enough(three, 0.10, 0.05), "Only 3 examples", f"{data.MIN_PER_SPLIT} examples",
                "at least 100")
    assert "N_SAMPLES" in msg
    data.check_enough(three.sample(100, replace=True, random_state=0), 0.10, 0.05)  # exactly enough


def test_links_pipes_and_unreadable_files(project, monkeypatch):
    (project / "gone.csv").symlink_to(project / "nowhere.csv")
    fails(project / "gone.csv", "a link to", "nowhere.csv", "does not exist")
    os.mkfifo(project / "pipe.csv")
    fails(project / "pipe.csv", "not a regular file")  # would block forever if it were read

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "read_bytes", denied)  # as root, chmod 000 would not stop the read
        fails(project / "data" / "medquad.csv", "cannot be read", "Permission denied", "chmod u+r")


# ---------------------------------------------------------------- settings of the wrong type or out of range

@pytest.mark.parametrize("name,value,words", [
    ("OVERWRITE", "maybe", ["OVERWRITE='maybe'", "True or False", "MEDQA_OVERWRITE=1, true or yes"]),
    ("OVERWRITE", 1, ["OVERWRITE=1", "True or False"]),
    ("MASK_PROMPT", "yes", ["MASK_PROMPT='yes'", "True or False"]),
    ("BATCH_SIZE", 8.0, ["BATCH_SIZE=8.0", "write 8 without the decimal point"]),
    ("BATCH_SIZE", True, ["BATCH_SIZE=True", "a whole number"]),
    ("EPOCHS", "2", ["EPOCHS='2'", "a whole number"]),
    ("LEARNING_RATE", "5e-5", ["LEARNING_RATE='5e-5'", "a number"]),
    ("MODEL", 2, ["MODEL=2", "text"]),
    ("N_SAMPLES", 100.5, ["N_SAMPLES=100.5", "a whole number or None"]),
    ("SEED", -1, ["SEED=-1", "2**32 - 1"]),
    ("SEED", 2**32, ["SEED=4294967296", "2**32 - 1"]),
    ("LEARNING_RATE", float("inf"), ["LEARNING_RATE=inf", "not a finite number"]),
    ("LEARNING_RATE", float("nan"), ["LEARNING_RATE=nan", "not a finite number"]),
    ("WEIGHT_DECAY", float("inf"), ["WEIGHT_DECAY=inf", "not a finite number"]),
    ("JUDGE_BUDGET_S", float("inf"), ["JUDGE_BUDGET_S=inf", "not a finite number"]),
    ("OUTPUT_DIR", "", ["OUTPUT_DIR=''", "current folder"]),
    ("OUTPUT_DIR", "  ", ["names no folder"]),
])
def test_settings_of_the_wrong_type_or_range_are_named(project, name, value, words):
    fails(lambda: resolve(**{name: value}), *words)


@pytest.mark.parametrize("name,text,words", [
    ("OVERWRITE", "maybe", ["MEDQA_OVERWRITE='maybe'", "1, true or yes", "0, false or no"]),
    ("OUTPUT_DIR", "", ["OUTPUT_DIR=''", "current folder"]),
    ("LEARNING_RATE", "inf", ["LEARNING_RATE=inf", "not a finite number"]),
    ("SEED", "-1", ["SEED=-1"]),
    ("BATCH_SIZE", "8.0", ["MEDQA_BATCH_SIZE='8.0'", "a whole number", "like 8"]),
])
def test_environment_values_of_the_wrong_type_or_range_are_named(project, name, text, words):
    fails(lambda: settings.resolve({"PROFILE": "smoke"}, env={f"MEDQA_{name}": text}), *words)


def test_output_dir_that_is_a_file_or_read_only(project, monkeypatch):
    write(project / "afile", "x")
    fails(lambda: resolve(OUTPUT_DIR=str(project / "afile")), "is a file, not a folder")
    fails(lambda: resolve(OUTPUT_DIR=str(project / "afile" / "run")), "which is a file")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # as root, chmod cannot make a folder read-only
    fails(lambda: resolve(OUTPUT_DIR=str(project / "runs" / "new")), "cannot be written", "read-only", "chmod u+w")


# ---------------------------------------------------------------- model folders

@pytest.fixture
def gpt2_folder(tmp_path):
    from medqa import model as gpt

    return gpt.build_tiny_gpt2(tmp_path / "m", seed=0)


def test_model_folder_with_truncated_weights(project, gpt2_folder):
    weights = gpt2_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 5_000_000])
    fails(lambda: resolve(MODEL=str(gpt2_folder)), "model.safetensors is cut short", "5,000,000 of", "save the folder")
    weights.write_bytes(b"")
    fails(lambda: resolve(MODEL=str(gpt2_folder)), "model.safetensors", "header is damaged")


def test_model_folder_with_truncated_pytorch_weights(project, gpt2_folder):
    import torch

    (gpt2_folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1000)}, gpt2_folder / "pytorch_model.bin")
    raw = (gpt2_folder / "pytorch_model.bin").read_bytes()
    (gpt2_folder / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    fails(lambda: resolve(MODEL=str(gpt2_folder)), "pytorch_model.bin is cut short")


def test_model_folder_with_another_architecture_or_no_config(project, gpt2_folder):
    config = json.loads((gpt2_folder / "config.json").read_text())
    (gpt2_folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    fails(lambda: resolve(MODEL=str(gpt2_folder)), "holds a 'llama' model", "not GPT-2", "gpt2-medium")
    (gpt2_folder / "config.json").write_text("")
    fails(lambda: resolve(MODEL=str(gpt2_folder)), "config.json is empty")
    (gpt2_folder / "config.json").unlink()
    fails(lambda: resolve(MODEL=str(gpt2_folder)), "without config.json", "save_pretrained")
    fails(lambda: resolve(MODEL=str(project / "data")), "without config.json")


def test_model_folder_without_weights(project, gpt2_folder):
    (gpt2_folder / "model.safetensors").unlink()
    fails(lambda: resolve(MODEL=str(gpt2_folder)), "holds no weights", "model.safetensors")


def test_loading_damaged_weights_gives_a_medqa_error(project, gpt2_folder):
    import torch
    from medqa import model as gpt

    weights = gpt2_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5_000_000])
    fails(lambda: gpt.load_model(str(gpt2_folder), torch.device("cpu")), "does not load as GPT-2", "damaged")


def test_loading_a_model_keeps_the_download_progress_bar(gpt2_folder):
    import torch
    from huggingface_hub.utils import are_progress_bars_disabled
    from medqa import model as gpt

    gpt.load_model(str(gpt2_folder), torch.device("cpu"))
    assert not are_progress_bars_disabled()  # huggingface_hub's download bar: a 1.4 GB download shows it moves
