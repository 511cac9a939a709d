"""Find MedQuAD (a given file, a local copy, or a download), read it into one table (medqa.data_file), clean
it, and say what was read."""

import html
import math
import os
import re
import shutil
import tempfile
import urllib.request
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd

from medqa import store
from medqa.data_file import COLUMNS, SUFFIXES, read_table, refuse_url
from medqa.errors import MedQAError, StorageError, retry

DATA_DIR = Path("data")
LOCAL_NAMES = ("medquad.csv", "medquad.json", "medquad.jsonl")
GDRIVE_FOLDER_ID = "1ya6r4ZSbsnuo_fUUQY6VPzajpZvJis5d"  # the original project's Google Drive folder
GITHUB_ZIP = "https://github.com/abachaa/MedQuAD/archive/refs/heads/master.zip"  # public MedQuAD, CC BY 4.0
MIN_PER_SPLIT = 5  # fewer training, validation or test examples than this make no run worth the time
NO_DATA_HELP = ("set DATA_PATH (or MEDQA_DATA_PATH) to a MedQuAD CSV or an Alpaca JSON / JSON Lines file, "
                "or put medquad.csv into data/")
# A markup tag (<p>, </div>, <br/>) or comment; "<" before a digit or a space ("<10 ug/dL") is text.
MARKUP = re.compile(r"<!--.*?-->|</?[A-Za-z][\w:-]*(\s[^<>]*)?/?>", re.DOTALL)
# MedQuAD's sources of the answers it publishes (the `source` of its XML documents).
MEDQUAD_SOURCES = {"CancerGov", "CDC", "GARD", "GHR", "MPlusHealthTopics", "NHLBI", "NIDDK",
                   "NIHSeniorHealth", "NINDS"}


def check_enough(df: pd.DataFrame, val_fraction: float, test_fraction: float) -> None:
    """Refuse data too small to give the training, validation and test split MIN_PER_SPLIT examples each."""
    smallest = min(val_fraction, test_fraction, 1 - val_fraction - test_fraction)
    need = math.ceil(MIN_PER_SPLIT / smallest - 1e-9)
    if len(df) < need:
        raise MedQAError(f"Only {len(df)} examples are left after cleaning and N_SAMPLES: with VAL_FRACTION="
                         f"{val_fraction} and TEST_FRACTION={test_fraction} a split would get fewer than "
                         f"{MIN_PER_SPLIT} examples, the minimum per split. Use at least {need} examples (a "
                         f"larger data file or N_SAMPLES), or raise the smaller fraction.")


def _download(action, what: str, retries: int, backoff: float):
    """`action()` with retries; a download that keeps failing ends in one MedQAError that says why."""
    try:
        # A write that failed for lack of space or permission fails again: StorageError says so at once.
        return retry(action, retries, backoff, retry_on=(Exception,), give_up_on=(StorageError,))
    except StorageError:
        raise
    except Exception as last:  # noqa: BLE001 - any failure of a download is retried, then reported
        detail = str(last).splitlines()[0][:200] if str(last) else ""
        raise MedQAError(f"{what} failed after {retries} tries: {type(last).__name__}: {detail}") from None


def download_url(url: str, dest: Path, timeout: float = 60, retries: int = 3, backoff: float = 2.0,
                 validate=None) -> Path:
    """Download `url` to `dest` through a temporary file, renamed into place only once `validate` passes."""

    def attempt():
        # the temporary name ends in dest's name, so that `validate` sees its extension
        with store.atomic_write(dest) as tmp:
            with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as resp:
                expected = resp.headers.get("Content-Length")
                shutil.copyfileobj(resp, f)
                size = f.tell()
            if expected is not None and size != int(expected):
                raise OSError(f"got {size} of {expected} bytes")
            if validate is not None:
                validate(tmp)
        return dest

    return _download(attempt, f"Downloading {url}", retries, backoff)


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


def fetch_from_gdrive(data_dir: Path, retries: int = 3, backoff: float = 2.0) -> Path:
    """The original project's Google Drive folder, through gdown; the first readable data file is kept."""
    import gdown

    def attempt():
        with tempfile.TemporaryDirectory(dir=data_dir, prefix=".gdrive-") as tmp:
            result = gdown.download_folder(id=GDRIVE_FOLDER_ID, output=tmp, quiet=True)
            if not result:
                raise OSError("gdown returned no files")
            found = sorted(p for p in Path(tmp).rglob("*") if p.suffix.lower() in SUFFIXES)
            found.sort(key=lambda p: "medquad" not in p.name.lower())
            if not found:
                raise OSError("the folder holds no .csv, .json or .jsonl file")
            read_table(found[0])
            dest = data_dir / ("medquad" + found[0].suffix.lower())
            with store.atomic_write(dest) as keep:
                os.replace(found[0], keep)
            return dest

    return _download(attempt, "Downloading the Google Drive folder with gdown", retries, backoff)


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
        raise MedQAError(f"{zpath} is not a readable MedQuAD release ({err}); it was removed, so the next "
                         f"run downloads it again.") from None
    dest = data_dir / "medquad.csv"
    with store.atomic_write(dest) as tmp:
        medquad = table.rename(columns={"instruction": "question", "output": "answer"}).drop(columns="input")
        medquad.to_csv(tmp, index=False)
        read_table(tmp)  # only a file that reads back replaces anything
    return dest


# Where MedQuAD is downloaded from, in this order, when DATA_PATH is not set and data/ holds no copy.
SOURCES = [("Google Drive (gdown)", fetch_from_gdrive), ("GitHub abachaa/MedQuAD", fetch_from_github)]


def locate_data(data_path: str | None, data_dir: Path = DATA_DIR, log=print) -> Path:
    """DATA_PATH if set; else a copy in data/; else a download (gdown, then the GitHub release) into data/."""
    if data_path:
        refuse_url(data_path)
        return Path(data_path).expanduser()
    for name in LOCAL_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise store.write_error(data_dir, err) from None
    failures = []
    for label, fetch in SOURCES:
        try:
            log(f"Downloading MedQuAD from {label} ...")
            return fetch(data_dir)
        except MedQAError as err:
            failures.append(f"{label}: {err}")
            log(f"  failed: {err}")
    raise MedQAError("No MedQuAD data: DATA_PATH is not set, data/ holds no copy, and the downloads failed "
                     f"({'; '.join(failures)}). Fix: {NO_DATA_HELP}.")


def normalise_whitespace(text: str) -> str:
    """One space between words, no blanks at line ends, at most one empty line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [re.sub(r"[ \t\f\v\xa0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def text_of(field: str) -> str:
    """What a question or answer says once markup tags, entities (`&nbsp;`) and white space are removed."""
    return html.unescape(MARKUP.sub(" ", field)).strip()


def clean(df: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The table with whitespace normalised and without rows lacking a question or answer (or their text), or
    repeating a pair; and how many rows each rule removed. Markup with text is kept as it is."""
    df = df.assign(**{col: df[col].map(normalise_whitespace) for col in ("instruction", "input", "output")})
    report = {"rows read": len(df)}
    rules = {"empty answer": df["output"] == "", "empty question": df["instruction"] == "",
             "answer only markup": df["output"].map(text_of) == "",
             "question only markup": df["instruction"].map(text_of) == "",
             # the rules above look only at the pair, so they drop every copy of a pair or none
             "duplicate pair": df.duplicated(subset=["instruction", "input", "output"])}
    drop = pd.Series(False, index=df.index)
    for rule, hits in rules.items():
        report[rule] = int((hits & ~drop).sum())
        drop |= hits
    df = df[~drop].reset_index(drop=True)
    report["rows kept"] = len(df)
    return df, report


def describe(path, table: pd.DataFrame) -> dict:
    """What data a run read, for its records: the file's name, its rows, and whether it is MedQuAD (every
    answered row comes from one of MEDQUAD_SOURCES)."""
    answered = table.loc[table["output"].str.strip() != "", "source"]
    medquad = len(answered) > 0 and bool(answered.isin(MEDQUAD_SOURCES).all())
    return {"file": Path(path).name, "rows": len(table), "medquad": medquad}


def sample_rows(df: pd.DataFrame, n: int | None, seed: int, log=print) -> pd.DataFrame:
    """A seeded random subset (the file is ordered by source, so the head would be one source only)."""
    if n is None or n >= len(df):
        if n is not None:
            log(f"N_SAMPLES={n} is more than the {len(df)} rows the data has: using all of them.")
        return df
    return df.sample(n=n, random_state=seed).reset_index(drop=True)
