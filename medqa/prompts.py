"""Step 4 and 5: Alpaca-style prompts (instruction / input / response) and a leak-free train/val/test split."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path

import pandas as pd

from medqa.data import MIN_PER_SPLIT
from medqa.errors import MedQAError
from medqa.store import write_json_atomic

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def format_prompt(instruction: str, input_text: str = "") -> str:
    """Everything the model sees before its answer; ends where the response begins."""
    prompt = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        prompt += f"\n\n### Input:\n{input_text}"
    return prompt + "\n\n### Response:\n"


def same_text_key(text: str) -> str:
    """What two spellings of one text share: case, punctuation, hyphens and spaces ignored.

    "Cri-du-chat" and "Cri du chat", or "Stiff-Person" and "Stiff person", are one key.
    """
    return re.sub(r"[\W_]+", "", text.lower())


def related_groups(df: pd.DataFrame) -> tuple[list[int], dict]:
    """A group id per row: rows that share a question or an answer (same_text_key), directly or through others.

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

    Whole groups of related rows (related_groups) move together, so the test set never asks something the model
    was trained on, nor expects an answer it was trained to write. In a seeded order, a group goes to test, then
    validation, while it fits their share; the rest train. A group larger than GROUP_SHARE of a split's share
    stays in training, so that one boilerplate answer (MedQuAD's largest group has 377 rows) cannot fill it.
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
        raise MedQAError(f"The split leaves too few examples ({listing}; at least {MIN_PER_SPLIT} each) from {len(df)} "
                         f"examples in {stats['groups']} groups of related questions, VAL_FRACTION={val_fraction}, "
                         f"TEST_FRACTION={test_fraction}: use more examples (N_SAMPLES) or adjust the fractions.")
    log(f"{stats['rows']:,} rows in {stats['groups']:,} groups that share a question or an answer; "
        f"{stats['rows joined']:,} rows joined a group with another question (largest group: "
        f"{stats['largest group']:,} rows)")
    return splits["train"], splits["val"], splits["test"]


SPLIT_COLUMNS = ["instruction", "input", "output", "source", "focus_area"]


def save_splits(folder, **splits: pd.DataFrame) -> Path:
    """Write each split to `folder`/splits/<name>.json as Alpaca JSON (plus MedQuAD's source and focus_area)."""
    target = Path(folder) / "splits"
    target.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        write_json_atomic(target / f"{name}.json", frame[SPLIT_COLUMNS].to_dict(orient="records"))
    return target


def draw_alpaca_figure(instruction: str = "What are the symptoms of Glaucoma ?",
                       output: str = "Open-angle glaucoma often has no early symptoms ..."):
    """A picture of the prompt layout: the parts the model reads, and the part it learns to write."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    parts = [
        ("Preamble", PREAMBLE.replace(". ", ".\n"), "#e8e8e8"),
        ("### Instruction:", instruction, "#cfe3ff"),
        ("### Input:", "(empty for MedQuAD: the question says it all)", "#f3f3f3"),
        ("### Response:", output, "#d6f5d6"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4.6))
    ax.set_axis_off()
    y = 1.0
    for title, body, colour in parts:
        h = 0.2 if "\n" in body else 0.16
        y -= h + 0.04
        ax.add_patch(FancyBboxPatch((0.02, y), 0.96, h, boxstyle="round,pad=0.01", fc=colour, ec="#888888"))
        ax.text(0.04, y + h - 0.035, title, fontsize=11, fontweight="bold", va="top", family="monospace")
        ax.text(0.04, y + h - 0.09, body, fontsize=9.5, va="top", family="monospace")
    ax.text(0.5, 0.0, "prompt = preamble + instruction (+ input) + '### Response:'      target = the answer",
            ha="center", fontsize=9, style="italic")
    ax.set_title("Alpaca-style prompt for a MedQuAD question", fontsize=12)
    fig.tight_layout()
    return fig


if __name__ == "__main__":  # python -m medqa.prompts images/alpaca-style.png
    import sys

    draw_alpaca_figure().savefig(sys.argv[1] if len(sys.argv) > 1 else "images/alpaca-style.png", dpi=120)
