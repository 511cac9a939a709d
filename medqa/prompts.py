"""Step 4 and 5: Alpaca-style prompts (instruction / input / response) and a leak-free train/val/test split."""

from __future__ import annotations

import random

import pandas as pd

from medqa.errors import MedQAError

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def format_prompt(instruction: str, input_text: str = "") -> str:
    """Everything the model sees before its answer; ends where the response begins."""
    prompt = f"{PREAMBLE}\n\n### Instruction:\n{instruction}"
    if input_text:
        prompt += f"\n\n### Input:\n{input_text}"
    return prompt + "\n\n### Response:\n"


def split_by_question(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int):
    """Shuffle with `seed` and cut into train / val / test so that no question text is in two splits.

    Rows that share a question (case and spacing ignored) move together, so the test set never asks
    something the model was trained on.
    """
    key = df["instruction"].str.lower().str.split().str.join(" ")
    groups = list(dict.fromkeys(key))
    random.Random(seed).shuffle(groups)
    sizes = key.value_counts()
    n = len(df)
    targets = {"test": test_fraction * n, "val": val_fraction * n}
    assign, filled, order = {}, {"test": 0, "val": 0}, ["test", "val"]
    for g in groups:
        part = next((p for p in order if filled[p] < targets[p]), "train")
        assign[g] = part
        if part != "train":
            filled[part] += sizes[g]
    part_of = key.map(assign)
    splits = {p: df[part_of == p].reset_index(drop=True) for p in ("train", "val", "test")}
    empty = [p for p, part in splits.items() if part.empty]
    if empty:
        raise MedQAError(f"The split leaves the {' and '.join(empty)} set empty ({len(df)} examples, "
                         f"{len(groups)} distinct questions, VAL_FRACTION={val_fraction}, TEST_FRACTION={test_fraction}): "
                         f"use more examples (N_SAMPLES) or adjust the fractions.")
    return splits["train"], splits["val"], splits["test"]


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
