"""Step 2 and 3: find MedQuAD (a given file, a local copy, or a download), read it into one table, clean it.

The table always has the columns `instruction`, `input`, `output`, `source`, `focus_area`: MedQuAD CSV
(`question, answer, source, focus_area`) and Alpaca JSON / JSON Lines (`instruction, input, output`) both map
onto it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from medqa.errors import MedQAError

DATA_DIR = Path("data")
LOCAL_NAMES = ("medquad.csv", "medquad.json", "medquad.jsonl")
GDRIVE_FOLDER_ID = "1ya6r4ZSbsnuo_fUUQY6VPzajpZvJis5d"  # the original project's Google Drive folder
GITHUB_ZIP = "https://github.com/abachaa/MedQuAD/archive/refs/heads/master.zip"  # public MedQuAD, CC BY 4.0
SUFFIXES = (".csv", ".json", ".jsonl")
COLUMNS = ["instruction", "input", "output", "source", "focus_area"]
NO_DATA_HELP = ("set DATA_PATH (or MEDQA_DATA_PATH) to a MedQuAD CSV or an Alpaca JSON / JSON Lines file, "
                "or put medquad.csv into data/")


# ---------------------------------------------------------------- reading one file

def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise MedQAError(f"{path} is empty: point DATA_PATH at a MedQuAD CSV or Alpaca JSON file with rows in it.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise MedQAError(
            f"{path} is not UTF-8 text (byte {err.start} cannot be decoded). If it was saved as Latin-1 / Windows-1252, "
            f"convert it first, e.g. `iconv -f cp1252 -t utf-8 {path.name} > {path.stem}-utf8{path.suffix}`, "
            f"and point DATA_PATH at the converted file.") from None


def _from_csv(path: Path, text: str) -> pd.DataFrame:
    try:
        # The python engine reports an unclosed quote instead of silently swallowing the rest of the file.
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, engine="python")
    except (pd.errors.ParserError, csv.Error) as err:
        raise MedQAError(f"{path} is not a well-formed CSV ({err}). Look for an unclosed double quote near there; "
                         f"fields with commas, quotes or newlines must be quoted as in RFC 4180.") from None
    df.columns = [str(c).strip().lower() for c in df.columns]
    if len(df) == 0:
        raise MedQAError(f"{path} has a header but no rows: it needs at least a few hundred question/answer rows.")
    missing = [c for c in ("question", "answer") if c not in df.columns]
    if missing:
        raise MedQAError(f"{path} lacks the column(s) {missing}: a MedQuAD CSV needs `question` and `answer` "
                         f"(it has {list(df.columns)}). Rename the columns or export the file again.")
    return pd.DataFrame({"instruction": df["question"], "input": "", "output": df["answer"],
                         "source": df.get("source", ""), "focus_area": df.get("focus_area", "")})


def _from_records(path: Path, records) -> pd.DataFrame:
    if not isinstance(records, list) or not records:
        raise MedQAError(f"{path} holds no list of records: Alpaca JSON is a list of objects with "
                         f"`instruction`, `input` and `output`.")
    bad = [i for i, r in enumerate(records)
           if not isinstance(r, dict) or "instruction" not in r or "output" not in r]
    if bad:
        raise MedQAError(f"{path}: {len(bad)} of {len(records)} records lack `instruction` or `output` "
                         f"(the first is record {bad[0]}). Each record needs both; `input` may be empty.")
    df = pd.DataFrame.from_records(records)
    out = pd.DataFrame({c: df[c] if c in df.columns else "" for c in COLUMNS})
    return out.fillna("").astype(str)


def read_table(path) -> pd.DataFrame:
    """Read a MedQuAD CSV or an Alpaca JSON / JSON Lines file into the common table."""
    path = Path(path)
    if not path.exists():
        raise MedQAError(f"DATA_PATH {str(path)!r} does not exist: fix the path, or unset DATA_PATH to use data/ "
                         f"or a download.")
    if path.is_dir():
        raise MedQAError(f"DATA_PATH {str(path)!r} is a folder: point it at one file inside it, e.g. medquad.csv.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise MedQAError(f"DATA_PATH {str(path)!r} has the extension {suffix or '(none)'!r}, which is not read: "
                         f"use a .csv (MedQuAD columns) or .json / .jsonl (Alpaca records).")
    text = _read_text(path)
    if suffix == ".csv":
        df = _from_csv(path, text)
    elif suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise MedQAError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
                             f"Fix the file there, or export it again.") from None
        df = _from_records(path, records)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise MedQAError(f"{path} is not valid JSON Lines: line {lineno}, column {err.colno}: "
                                     f"{err.msg}. Each line must be one JSON object.") from None
        df = _from_records(path, records)
    if not df["output"].str.strip().astype(bool).any():
        raise MedQAError(f"{path}: every answer is empty or blank, so there is nothing to learn from. "
                         f"Check that the answer column holds the answers.")
    return df


# ---------------------------------------------------------------- finding or downloading the data

def _retry(action, what: str, retries: int, backoff: float):
    """Run `action()` up to `retries` times, waiting backoff, 2*backoff, ... between tries."""
    last = None
    for attempt in range(retries):
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - any failure of a download is retried, then reported
            last = err
            if attempt + 1 < retries:
                time.sleep(backoff * 2**attempt)
    detail = str(last).splitlines()[0][:200] if str(last) else ""
    raise MedQAError(f"{what} failed after {retries} tries: {type(last).__name__}: {detail}")


def download_url(url: str, dest: Path, timeout: float = 60, retries: int = 3, backoff: float = 2.0,
                 validate=None) -> Path:
    """Download `url` to `dest` through a temporary file that is renamed into place only once `validate` passes."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def attempt():
        # Hidden, and ending in the real name so that `validate` can read it by its extension.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-", suffix=f"-{dest.name}")
        try:
            with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as resp:
                expected = resp.headers.get("Content-Length")
                shutil.copyfileobj(resp, f)
                size = f.tell()
            if expected is not None and size != int(expected):
                raise OSError(f"got {size} of {expected} bytes")
            if validate is not None:
                validate(Path(tmp))
            os.replace(tmp, dest)
            return dest
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    return _retry(attempt, f"Downloading {url}", retries, backoff)


def parse_medquad_xml(files) -> pd.DataFrame:
    """Turn MedQuAD's XML documents (one per focus topic) into the common table."""
    rows = []
    for _name, content in files:
        root = ET.fromstring(content)
        source = root.get("source", "")
        focus = (root.findtext("Focus") or "").strip()
        for pair in root.iter("QAPair"):
            question = (pair.findtext("Question") or "").strip()
            answer = (pair.findtext("Answer") or "").strip()
            if question:
                rows.append({"instruction": question, "input": "", "output": answer, "source": source,
                             "focus_area": focus})
    if not rows:
        raise ValueError("no question/answer pairs found in the XML files")
    return pd.DataFrame(rows, columns=COLUMNS)


def _write_csv_atomic(df: pd.DataFrame, dest: Path) -> Path:
    tmp = dest.with_name(f".part-{dest.name}")
    try:
        df.rename(columns={"instruction": "question", "output": "answer"}).drop(columns="input").to_csv(tmp, index=False)
        read_table(tmp)  # only a file that reads back replaces anything
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_from_gdrive(data_dir: Path, download_folder=None, retries: int = 3, backoff: float = 2.0) -> Path:
    """The original project's Google Drive folder, through gdown; the first readable data file is kept."""
    if download_folder is None:
        import gdown

        download_folder = gdown.download_folder

    def attempt():
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".gdrive-") as tmp:
            result = download_folder(id=GDRIVE_FOLDER_ID, output=tmp, quiet=True)
            if not result:
                raise OSError("gdown returned no files")
            found = sorted(p for p in Path(tmp).rglob("*") if p.suffix.lower() in SUFFIXES)
            found.sort(key=lambda p: "medquad" not in p.name.lower())
            if not found:
                raise OSError("the folder holds no .csv, .json or .jsonl file")
            read_table(found[0])
            dest = data_dir / ("medquad" + found[0].suffix.lower())
            os.replace(found[0], dest)
            return dest

    return _retry(attempt, "Downloading the Google Drive folder with gdown", retries, backoff)


def fetch_from_github(data_dir: Path, url: str = GITHUB_ZIP, **kw) -> Path:
    """The public MedQuAD release (XML), parsed into data/medquad.csv."""
    zpath = data_dir / "MedQuAD-master.zip"

    def check_zip(tmp: Path):
        with zipfile.ZipFile(tmp) as z:
            if z.testzip() is not None:
                raise zipfile.BadZipFile("corrupt member")

    if not zpath.exists():
        download_url(url, zpath, validate=check_zip, **kw)
    try:
        with zipfile.ZipFile(zpath) as z:
            table = parse_medquad_xml([(n, z.read(n)) for n in z.namelist() if n.endswith(".xml")])
    except (zipfile.BadZipFile, ET.ParseError, ValueError) as err:
        zpath.unlink()  # our own download, and unusable: the next run fetches it again
        raise MedQAError(f"{zpath} is not a readable MedQuAD release ({err}); it was removed, so the next run "
                         f"downloads it again.") from None
    return _write_csv_atomic(table, data_dir / "medquad.csv")


def locate_data(data_path: str | None, data_dir: Path = DATA_DIR, sources=None, log=print) -> Path:
    """DATA_PATH if set; else a copy in data/; else a download (gdown, then the GitHub release) into data/."""
    if data_path:
        return Path(data_path)
    for name in LOCAL_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    data_dir.mkdir(parents=True, exist_ok=True)
    sources = sources if sources is not None else [("Google Drive (gdown)", fetch_from_gdrive),
                                                   ("GitHub abachaa/MedQuAD", fetch_from_github)]
    failures = []
    for label, fetch in sources:
        try:
            log(f"Downloading MedQuAD from {label} ...")
            return fetch(data_dir)
        except MedQAError as err:
            failures.append(f"{label}: {err}")
            log(f"  failed: {err}")
    raise MedQAError("No MedQuAD data: DATA_PATH is not set, data/ holds no copy, and the downloads failed "
                     f"({'; '.join(failures)}). Fix: {NO_DATA_HELP}.")


# ---------------------------------------------------------------- cleaning

def normalise_whitespace(text: str) -> str:
    """One space between words, no blanks at line ends, at most one empty line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t\f\v\xa0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """Normalise whitespace, drop rows without a question or answer and exact duplicate pairs.

    Returns the cleaned table and how many rows each rule removed.
    """
    df = df.copy()
    for col in ("instruction", "input", "output"):
        df[col] = df[col].map(normalise_whitespace)
    report = {"rows read": len(df)}
    keep = df["output"] != ""
    report["empty answer"] = int((~keep).sum())
    df = df[keep]
    keep = df["instruction"] != ""
    report["empty question"] = int((~keep).sum())
    df = df[keep]
    dup = df.duplicated(subset=["instruction", "input", "output"])
    report["duplicate pair"] = int(dup.sum())
    df = df[~dup].reset_index(drop=True)
    report["rows kept"] = len(df)
    return df, report


def sample_rows(df: pd.DataFrame, n: int | None, seed: int, log=print) -> pd.DataFrame:
    """A seeded random subset (the file is ordered by source, so the head would be one source only)."""
    if n is None or n >= len(df):
        if n is not None:
            log(f"N_SAMPLES={n} is more than the {len(df)} rows the data has: using all of them.")
        return df
    return df.sample(n=n, random_state=seed).reset_index(drop=True)
