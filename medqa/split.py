"""A leak-free train / validation / test split: related questions and answers never span two parts."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pandas as pd

from medqa.data import MIN_PER_SPLIT
from medqa.errors import MedQAError


def same_text_key(text: str) -> str:
    """What two spellings of one text share: case, punctuation, hyphens and spaces ignored.

    "Cri-du-chat" and "Cri du chat", or "Stiff-Person" and "Stiff person", are one key.
    """
    return re.sub(r"[\W_]+", "", text.lower())


def related_groups(df: pd.DataFrame) -> tuple[list[int], dict]:
    """A group id per row: rows that share a question or an answer (same_text_key), directly or through
    others.

    MedQuAD reuses boilerplate answers across questions and spells some questions two ways; a split that kept
    only identical questions together would test on answers the model was trained on. Returns the ids and what
    the grouping joined: `rows joined` counts rows in a group with more than one distinct question.
    """
    parent = list(range(len(df)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for column in ("instruction", "output"):
        first = {}
        for i, text in enumerate(df[column]):
            key = same_text_key(text)
            if key:  # an empty key (punctuation only) says nothing about what two rows share
                parent[root(i)] = root(first.setdefault(key, i))
    groups = [root(i) for i in range(len(df))]
    questions = {}
    for g, text in zip(groups, df["instruction"]):
        questions.setdefault(g, set()).add(same_text_key(text))
    stats = {"rows": len(df), "groups": len(questions),
             "rows joined": sum(len(questions[g]) > 1 for g in groups),
             "largest group": max(Counter(groups).values(), default=0)}
    return groups, stats


GROUP_SHARE = 0.05


def split_by_question(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int, log=print):
    """Shuffle with `seed` and cut into train / val / test so that no question and no answer is in two splits.

    Whole groups of related rows (related_groups) move together, so the test set never asks something the
    model was trained on, nor expects an answer it was trained to write. In a seeded order, a group goes to
    test then validation, while it fits their share; the rest train. A group larger than GROUP_SHARE of a
    split's share stays in training, so that one boilerplate answer shared by hundreds of rows cannot fill it.
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
