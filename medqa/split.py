"""A leak-free train / validation / test split: related questions and answers never span two parts."""

import math
import random
import re
from collections import Counter

import numpy as np
import pandas as pd
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from medqa.data import MIN_PER_SPLIT
from medqa.errors import MedQAError

GROUP_SHARE = 0.05


def same_text_key(text: str) -> str:
    """What two spellings of one text ("Cri-du-chat", "cri du chat") share: case, punctuation and spaces
    ignored."""
    return re.sub(r"[\W_]+", "", text.lower())


def related_groups(df: pd.DataFrame) -> tuple[list[int], dict]:
    """A group id per row: rows that share a question or an answer (same_text_key), directly or through
    others; and what the grouping joined (`rows joined`: rows in a group with more than one question)."""
    keys = {column: df[column].map(same_text_key) for column in ("instruction", "output")}
    first = {}  # each question's and each answer's first row; an empty key (punctuation only) joins nothing
    links = np.array([(i, first.setdefault((column, key), i)) for column, texts in keys.items()
                      for i, key in enumerate(texts) if key], dtype=int).reshape(-1, 2)
    graph = coo_array((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(len(df), len(df)))
    groups = connected_components(graph, directed=False)[1].tolist()
    questions = keys["instruction"].groupby(groups).transform("nunique")
    sizes = Counter(groups)
    stats = {"rows": len(df), "groups": len(sizes), "rows joined": int((questions > 1).sum()),
             "largest group": max(sizes.values(), default=0)}
    return groups, stats


def split_by_question(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int, log=print):
    """Train / val / test, with whole groups of related rows (related_groups) in one part each.

    In a seeded order, a group goes to test, else validation, while it fits their share; the rest train. A
    group over GROUP_SHARE of a share stays in training, so that one boilerplate answer cannot fill a split.
    """
    groups, stats = related_groups(df)
    order = list(dict.fromkeys(groups))
    random.Random(seed).shuffle(order)
    sizes = Counter(groups)
    n = len(df)
    room = {"test": math.ceil(test_fraction * n), "val": math.ceil(val_fraction * n)}
    largest = {p: max(1, GROUP_SHARE * r) for p, r in room.items()}
    assign = {}
    for g in order:
        part = next((p for p in ("test", "val") if sizes[g] <= min(room[p], largest[p])), "train")
        assign[g] = part
        if part != "train":
            room[part] -= sizes[g]
    part_of = pd.Series([assign[g] for g in groups], index=df.index)
    splits = {p: df[part_of == p].reset_index(drop=True) for p in ("train", "val", "test")}
    short = {p: len(part) for p, part in splits.items() if len(part) < MIN_PER_SPLIT}
    if short:  # data.check_enough counted rows; whole groups can still leave a split with fewer examples
        listing = ", ".join(f"{p} {n}" for p, n in short.items())
        raise MedQAError(f"The split leaves too few examples ({listing}; at least {MIN_PER_SPLIT} each) from "
                         f"{len(df)} examples in {stats['groups']} groups of related questions, "
                         f"VAL_FRACTION={val_fraction}, TEST_FRACTION={test_fraction}: use more examples "
                         f"(N_SAMPLES) or adjust the fractions.")
    log(f"{stats['rows']:,} rows in {stats['groups']:,} groups that share a question or an answer; "
        f"{stats['rows joined']:,} rows joined a group with another question (largest group: "
        f"{stats['largest group']:,} rows)")
    return splits["train"], splits["val"], splits["test"]
