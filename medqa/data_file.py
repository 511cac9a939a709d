"""Reading one data file into the common table: a MedQuAD CSV (`question, answer, source, focus_area`) or
Alpaca JSON / JSON Lines (`instruction, input, output`). A file that does not read is then judged by its
bytes (diagnose), so that the error says what it is and how to make it readable."""

import csv
import io
import json
import os
import zipfile
from pathlib import Path

import pandas as pd

from medqa import store
from medqa.errors import MedQAError

COLUMNS = ["instruction", "input", "output", "source", "focus_area"]
SUFFIXES = (".csv", ".json", ".jsonl")
_CSV_FIELDS = 2**31 - 1  # the csv module refuses fields over 128 KiB by default; a long answer is still fine
_KIND_NAMES = {"csv": "a CSV", "json": "one JSON document", "jsonl": "JSON Lines (one JSON object per line)"}
_KIND_SUFFIX = dict(zip(_KIND_NAMES, SUFFIXES))
_DELIMITERS = {";": "semicolon", "\t": "tab", "|": "pipe"}
# What a file that is not text really is, by its first bytes, and how to get a CSV from it.
_SAVE_AS_CSV = ("open it in Excel or LibreOffice, save it as 'CSV UTF-8 (comma delimited)' and point "
                "DATA_PATH at that file")
_UNPACK = "unpack it first (`{tool} -k {name}`) and point DATA_PATH at the unpacked file"
_MAGIC = [
    (b"\x1f\x8b", "gzip-compressed", _UNPACK.replace("{tool}", "gunzip")),
    (b"\xfd7zXZ\x00", "xz-compressed", _UNPACK.replace("{tool}", "unxz")),
    (b"BZh", "bzip2-compressed", _UNPACK.replace("{tool}", "bunzip2")),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Excel workbook (.xls) or another old Office file",
     _SAVE_AS_CSV),
    (b"%PDF", "a PDF document", "export the questions and answers as a CSV"),
    (b"PAR1", "a Parquet file",
     "convert it, e.g. `pandas.read_parquet(path).to_csv('medquad.csv', index=False)`"),
    (b"SQLite format 3\x00", "an SQLite database", "export the table as a CSV"),
]
# How to copy a file named by a URL onto this machine, by the URL's scheme.
_DOWNLOADERS = {"http": "curl -L -o data/medquad.csv '{url}'", "https": "curl -L -o data/medquad.csv '{url}'",
                "ftp": "curl -o data/medquad.csv '{url}'", "s3": "aws s3 cp '{url}' data/medquad.csv",
                "gs": "gsutil cp '{url}' data/medquad.csv"}


def read_table(path) -> pd.DataFrame:
    """A MedQuAD CSV or an Alpaca JSON / JSON Lines file as the common table, read as its extension says."""
    refuse_url(path)
    path = Path(path)
    if not path.exists():
        target = f" (a link to {os.readlink(path)!r}, which does not exist)" if path.is_symlink() else ""
        raise MedQAError(f"DATA_PATH {str(path)!r} does not exist{target}: fix the path, or unset DATA_PATH "
                         f"to use data/ or a download.")
    if path.is_dir():
        raise MedQAError(f"DATA_PATH {str(path)!r} is a folder: point it at one file inside it, e.g. "
                         "medquad.csv.")
    if not path.is_file():
        raise MedQAError(f"DATA_PATH {str(path)!r} is not a regular file (a pipe or a device): copy the "
                         f"data into a file and point DATA_PATH at it.")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise MedQAError(f"DATA_PATH {str(path)!r} cannot be read ({err.strerror or err}): make it readable "
                         f"(chmod u+r) or copy it somewhere you can read it.") from None
    try:
        return _parse(path, raw.decode("utf-8-sig"))
    except (MedQAError, UnicodeDecodeError):
        diagnose(path, raw)
        raise


def _parse(path: Path, text: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        kind = _content_kind(text, suffix)
        raise MedQAError(f"DATA_PATH {str(path)!r} has the extension {suffix or '(none)'!r}, which is not "
                         "read: use a .csv (MedQuAD columns) or .json / .jsonl (Alpaca records). It looks "
                         f"like {_KIND_NAMES[kind]}: if so, rename it to end in {_KIND_SUFFIX[kind]}.")
    df = _from_csv(path, text) if suffix == ".csv" else _from_json(path, text, suffix)
    for col, what in (("output", "answer"), ("instruction", "question")):
        if not df[col].str.strip().astype(bool).any():
            raise MedQAError(f"{path}: every {what} is empty or blank, so there is nothing to learn from. "
                             f"Check that the {what} column holds the {what}s.")
    return df


def _from_csv(path: Path, text: str) -> pd.DataFrame:
    columns = _header(text)
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        raise MedQAError(f"{path} has the column name(s) {twice} more than once (capitals and spaces "
                         f"ignored): rename or delete the extra column(s) so that each name is used once.")
    limit = csv.field_size_limit(_CSV_FIELDS)
    try:
        wide = next(((n, len(row)) for n, row in enumerate(csv.reader(io.StringIO(text)), 1)
                     if len(row) > len(columns)), None)
        if wide:  # pandas would quietly take the first column as an index and shift every other one
            raise MedQAError(f"{path}: row {wide[0]} has {wide[1]} fields but the header names "
                             f"{len(columns)}, so the columns would shift (a comma at the end of each row, "
                             "as some spreadsheets write, does this): remove the extra fields or name them "
                             "in the header.")
        # The python engine reports an unclosed quote instead of silently swallowing the rest of the file.
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, engine="python",
                         index_col=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as err:
        raise MedQAError(f"{path} is not a well-formed CSV ({err}). Look for an unclosed double quote near "
                         "there; fields with commas, quotes or newlines must be quoted as in RFC "
                         "4180.") from None
    finally:
        csv.field_size_limit(limit)
    df.columns = [str(c).strip().lower() for c in df.columns]
    if len(df) == 0:
        raise MedQAError(f"{path} has a header but no rows: it needs at least a few hundred question/answer "
                         "rows.")
    missing = [c for c in ("question", "answer") if c not in df.columns]
    if missing:
        raise MedQAError(f"{path} lacks the column(s) {missing}: a MedQuAD CSV needs `question` and `answer` "
                         f"(it has {list(df.columns)}). Rename the columns or export the file again.")
    return pd.DataFrame({"instruction": df["question"], "input": "", "output": df["answer"],
                         "source": df.get("source", ""), "focus_area": df.get("focus_area", "")})


def _from_json(path: Path, text: str, suffix: str) -> pd.DataFrame:
    if suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise MedQAError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
                             f"Fix the file there, or export it again.") from None
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise MedQAError(f"{path} is not valid JSON Lines: line {lineno}, column {err.colno}: "
                                     f"{err.msg}. Each line must be one JSON object.") from None
    if isinstance(records, dict):
        inner = [k for k, v in records.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        hint = (f" The records seem to be the list under {inner[0]!r}: save that list alone as the file."
                if inner else "")
        raise MedQAError(f"{path} holds one JSON object, not a list of records: Alpaca JSON is a list of "
                         f"objects with `instruction`, `input` and `output`.{hint}")
    if not isinstance(records, list) or not records:
        what = "an empty list" if records == [] else f"a JSON {type(records).__name__}"
        raise MedQAError(f"{path} holds {what}, no list of records: Alpaca JSON is a list of objects with "
                         f"`instruction`, `input` and `output`.")
    bad = [i for i, r in enumerate(records)
           if not isinstance(r, dict) or "instruction" not in r or "output" not in r]
    if bad:
        raise MedQAError(f"{path}: {len(bad)} of {len(records)} records lack `instruction` or `output` "
                         f"(the first is record {bad[0]}). Each record needs both; `input` may be empty.")
    wrong = [(i, k, r[k]) for i, r in enumerate(records) for k in ("instruction", "input", "output")
             if k in r and not isinstance(r[k], str)]
    if wrong:
        i, key, value = wrong[0]
        kind = "null" if value is None else {"list": "a list", "dict": "an object", "bool": "true/false"}.get(
            type(value).__name__, "a number")
        raise MedQAError(f"{path}: {len(wrong)} field(s) are not text; the first is `{key}` of record {i}, "
                         f"which is {kind} ({json.dumps(value)[:60]}). `instruction`, `input` and `output` "
                         "must be strings: write them in quotes (\"\" for an empty input) or drop those "
                         "records.")
    df = pd.DataFrame.from_records(records)
    return pd.DataFrame({c: df.get(c, "") for c in COLUMNS}).fillna("").astype(str)


def diagnose(path: Path, raw: bytes) -> None:
    """Raise a MedQAError that says what the file is when it is not what its extension promises; return when
    it is."""
    if not raw.removeprefix(b"\xef\xbb\xbf").strip():
        raise MedQAError(f"{path} is empty: point DATA_PATH at a MedQuAD CSV or Alpaca JSON file with rows "
                         "in it.")
    _refuse_binary(path, raw)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MedQAError(
            f"{path} is not UTF-8 text (byte {err.start} cannot be decoded). If it was saved as Latin-1 / "
            f"Windows-1252, convert it first, e.g. `iconv -f cp1252 -t utf-8 {path.name} > "
            f"{path.stem}-utf8{path.suffix}`, and point DATA_PATH at the converted file.") from None
    suffix = path.suffix.lower()
    expected = dict(zip(SUFFIXES, _KIND_NAMES)).get(suffix)
    kind, columns = _content_kind(text, suffix), _header(text)
    if expected and kind != expected and (kind != "csv" or {"question", "answer"} <= set(columns)):
        raise MedQAError(f"{path} holds {_KIND_NAMES[kind]}, not {_KIND_NAMES[expected]} as its name says: "
                         f"rename it to {path.stem}{_KIND_SUFFIX[kind]}.")
    if expected == "csv" and not {"question", "answer"} <= set(columns):
        for delimiter, name in _DELIMITERS.items():
            other = _header(text, delimiter)
            if len(other) > max(len(columns), 1) or {"question", "answer"} <= set(other):
                raise MedQAError(
                    f"{path} is {name}-separated, not comma-separated (its header splits into {other[:6]} at "
                    f"'{delimiter}'): save it again as 'CSV UTF-8 (comma delimited)', or convert it, e.g. "
                    f"`pandas.read_csv(path, sep={delimiter!r}).to_csv('medquad.csv', index=False)`.")


def _refuse_binary(path: Path, raw: bytes) -> None:
    """Refuse a file that is not UTF-8 text, saying what it is and the fix."""
    for magic, what, fix in _MAGIC:
        if raw.startswith(magic) and not (magic == b"BZh" and raw[3:4] not in b"123456789"):
            raise MedQAError(f"{path} is {what}, not a text file: {fix.format(name=path.name)}.")
    if raw.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            names = []
        if any(n.startswith("xl/") for n in names):
            raise MedQAError(f"{path} is an Excel workbook (.xlsx), not a CSV: {_SAVE_AS_CSV}.")
        inside = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        raise MedQAError(f"{path} is a zip archive ({inside or 'unreadable'}), not a CSV: unpack it and "
                         f"point DATA_PATH at the CSV or JSON file inside.")
    head = raw[:4000]
    odd, even = head[1::2].count(0), head[0::2].count(0)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or max(odd, even) > len(head) // 4 > 10 * min(odd, even):
        raise MedQAError(f"{path} is UTF-16 text (as Excel's 'Unicode Text' saves it), not UTF-8: convert "
                         f"it, e.g. `iconv -f UTF-16 -t UTF-8 {path.name} > {path.stem}-utf8{path.suffix}`, "
                         f"or {_SAVE_AS_CSV}.")
    if 0 in head:
        raise MedQAError(f"{path} is a binary file, not text (byte {head.index(0)} is NUL): point DATA_PATH "
                         f"at a MedQuAD CSV or an Alpaca JSON / JSON Lines file.")


def _content_kind(text: str, suffix: str) -> str:
    """'json', 'jsonl' or 'csv', by what the text holds; the name decides only where both JSON kinds fit (one
    object on one line)."""
    body = text.lstrip()
    if not body.startswith("{"):
        return "json" if body.startswith("[") else "csv"
    try:
        json.loads(body)
    except json.JSONDecodeError as err:
        return "jsonl" if err.msg == "Extra data" else "json"
    return "json" if suffix == ".json" or len(body.strip().splitlines()) > 1 else "jsonl"


def _header(text: str, delimiter: str = ",") -> list[str]:
    try:
        return [str(c).strip().lower() for c in next(csv.reader(io.StringIO(text), delimiter=delimiter), [])]
    except csv.Error:
        return []


def refuse_url(data_path) -> None:
    """Refuse a DATA_PATH that is a URL (https://, s3://, ...), with the way to download it, before a path
    made from it loses a slash."""
    text = str(data_path).strip()
    name = store.url_scheme(text)
    if name is None:
        return
    if name == "file":
        raise MedQAError(f"DATA_PATH {text!r} is a file: URL, which is not read: write the file's path "
                         f"instead, e.g. {text[len('file://'):]!r}.")
    how = _DOWNLOADERS.get(name)
    how = f"e.g. `{how.format(url=text)}`" if how else f"with the tool of that {name}:// storage, into data/"
    raise MedQAError(f"DATA_PATH {text!r} is a URL, and DATA_PATH is not downloaded: only a file on this "
                     f"machine is read. Download it first, {how}, then unset DATA_PATH (a copy in "
                     f"data/medquad.csv is used) or point it at the downloaded file.")
