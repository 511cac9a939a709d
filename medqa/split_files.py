"""The split written as Alpaca JSON files, for checking it, reusing it with other tools, or comparing runs."""

from pathlib import Path

import pandas as pd

from medqa.data_file import COLUMNS
from medqa.store import write_json_atomic


def save_splits(folder, **splits: pd.DataFrame) -> Path:
    """Write each split to `folder`/splits/<name>.json as Alpaca JSON (plus source and focus_area)."""
    target = Path(folder) / "splits"
    target.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        write_json_atomic(target / f"{name}.json", frame[COLUMNS].to_dict(orient="records"))
    return target
