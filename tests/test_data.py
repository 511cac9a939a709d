import json

import pytest

from medqa import data
from medqa.errors import MedQAError
from tests.sample_data import write_sample_alpaca_json, write_sample_csv


def test_reads_medquad_csv_into_the_common_table(tmp_path):
    df = data.read_table(write_sample_csv(tmp_path / "m.csv"))
    assert list(df.columns) == data.COLUMNS
    assert len(df) == 308 and (df["input"] == "").all()
    assert df["instruction"].iloc[0].endswith("?")


def test_reads_alpaca_json_and_json_lines(tmp_path):
    js = write_sample_alpaca_json(tmp_path / "a.json")
    records = json.loads(js.read_text())
    records[0]["input"] = "some context"
    js.write_text(json.dumps(records))
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for path in (js, jl):
        df = data.read_table(path)
        assert len(df) == len(records) and df["input"].iloc[0] == "some context"
        assert df["output"].iloc[1] == records[1]["output"]


def test_normalise_whitespace():
    assert data.normalise_whitespace("  Key Points\n      - a    b\r\n\n\n\n  c  ") == "Key Points\n- a b\n\nc"


def test_clean_counts_what_each_rule_removes():
    import pandas as pd

    df = pd.DataFrame({"instruction": ["q1", "q1", "q2", "", "q3"], "input": "",
                       "output": ["a  1", "a 1", "   ", "a", "a3"], "source": "", "focus_area": ""})
    out, report = data.clean(df)
    assert report == {"rows read": 5, "empty answer": 1, "empty question": 1, "answer only markup": 0,
                      "question only markup": 0, "duplicate pair": 1, "rows kept": 2}
    assert list(out["output"]) == ["a 1", "a3"]


def test_sample_rows_is_seeded_and_notes_too_large_requests(tmp_path):
    df = data.read_table(write_sample_csv(tmp_path / "m.csv"))
    a, b = data.sample_rows(df, 50, 1), data.sample_rows(df, 50, 1)
    assert a.equals(b) and len(a) == 50
    notes = []
    assert len(data.sample_rows(df, 10_000, 1, log=notes.append)) == len(df)
    assert "using all" in notes[0]


def test_locate_prefers_data_path_then_a_local_copy_then_downloads(tmp_path, monkeypatch):
    calls = []

    def fake_download(folder):
        calls.append(folder)
        return write_sample_csv(folder / "medquad.csv")

    monkeypatch.setattr(data, "SOURCES", [("fake", fake_download)])
    given = write_sample_csv(tmp_path / "given.csv")
    assert data.locate_data(str(given), tmp_path / "d") == given and not calls
    got = data.locate_data(None, tmp_path / "d", log=lambda *_: None)
    assert got == tmp_path / "d" / "medquad.csv" and len(calls) == 1
    assert data.locate_data(None, tmp_path / "d") == got and len(calls) == 1  # reused, not downloaded again


def test_no_data_and_no_network_ends_with_a_clear_error(tmp_path, monkeypatch):
    import gdown

    def no_gdown(**kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(gdown, "download_folder", no_gdown)
    monkeypatch.setattr(data, "SOURCES", [
        ("Google Drive", lambda d: data.fetch_from_gdrive(d, retries=1)),
        ("GitHub", lambda d: data.fetch_from_github(d, url="http://127.0.0.1:9/x.zip", retries=1))])
    with pytest.raises(MedQAError, match="DATA_PATH"):
        data.locate_data(None, tmp_path / "d", log=lambda *_: None)
    assert list((tmp_path / "d").iterdir()) == []


def test_medquad_xml_is_parsed_into_the_table():
    xml = b"""<?xml version="1.0"?><Document id="1" source="GHR"><Focus>Gout</Focus>
      <QAPairs><QAPair pid="1"><Question qid="1" qtype="cause">What causes gout ?</Question>
      <Answer>Uric acid crystals.</Answer></QAPair></QAPairs></Document>"""
    df = data.parse_medquad_xml([("a.xml", xml)])
    assert df.iloc[0].to_dict() == {"instruction": "What causes gout ?", "input": "", "output": "Uric acid crystals.",
                                    "source": "GHR", "focus_area": "Gout"}


@pytest.mark.parametrize("url, how", [
    ("https://example.org/medquad.csv", "curl -L -o data/medquad.csv 'https://example.org/medquad.csv'"),
    ("http://example.org/data/medquad.csv", "curl -L -o data/medquad.csv 'http://example.org/data/medquad.csv'"),
    ("ftp://ftp.example.org/medquad.csv", "curl -o data/medquad.csv"),
    ("s3://bucket/medquad.csv", "aws s3 cp 's3://bucket/medquad.csv' data/medquad.csv"),
    ("gs://bucket/medquad.csv", "gsutil cp"),
    ("HTTPS://EXAMPLE.ORG/M.CSV", "curl -L"),
    ("webdav://host/medquad.csv", "webdav:// storage"),
])
def test_a_url_as_data_path_is_named_a_url_with_how_to_download_it(url, how):
    for call in (data.locate_data, data.read_table):
        with pytest.raises(MedQAError) as err:
            call(url)
        said = str(err.value)
        assert f"DATA_PATH {url!r} is a URL" in said and "not downloaded" in said and how in said
        assert "does not exist" not in said


def test_a_file_url_says_to_write_the_path(tmp_path):
    with pytest.raises(MedQAError, match="write the file's path instead.*'/data/medquad.csv'"):
        data.locate_data("file:///data/medquad.csv")
    path = write_sample_csv(tmp_path / "m.csv")
    assert len(data.read_table(str(path))) == 308  # a plain path, also with "://" nowhere, is read


def test_answers_of_markup_without_text_are_dropped_and_counted_and_real_ones_kept():
    import pandas as pd

    answers = ["<p></p>", "<div><br/></div>", "<p> </p>", "<p>&nbsp;</p><!-- x -->", "<p>Gout is <b>arthritis</b>.</p>",
               "Levels <10 ug/dL and > 5 are < normal", "   ", "a"]
    questions = ["q1", "q2", "q3", "q4", "q5", "q6", "q7", "<p></p>"]
    df = pd.DataFrame({"instruction": questions, "input": "", "output": answers, "source": "", "focus_area": ""})
    out, report = data.clean(df)
    assert report == {"rows read": 8, "empty answer": 1, "empty question": 0, "answer only markup": 4,
                      "question only markup": 1, "duplicate pair": 0, "rows kept": 2}
    assert list(out["output"]) == ["<p>Gout is <b>arthritis</b>.</p>", "Levels <10 ug/dL and > 5 are < normal"]
    assert data.text_of("<div><br/></div>") == "" and data.text_of("x < 5") == "x < 5"


def test_what_data_was_read_names_the_file_and_says_whether_it_is_medquad(tmp_path):
    medquad = data.read_table(write_sample_csv(tmp_path / "m.csv"))
    assert data.describe(tmp_path / "m.csv", medquad) == {"file": "m.csv", "rows": 308, "medquad": True}
    mine = data.read_table(write_sample_alpaca_json(tmp_path / "mine.json"))
    assert data.describe(tmp_path / "mine.json", mine)["medquad"] is False
    chinese = tmp_path / "zh.csv"
    chinese.write_text("question,answer,source\n什么是糖尿病？,糖尿病是一种慢性疾病。,某医院\n", encoding="utf-8")
    assert data.describe(chinese, data.read_table(chinese)) == {"file": "zh.csv", "rows": 1, "medquad": False}
