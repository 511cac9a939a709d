"""How good are the answers? ROUGE, BLEU, perplexity of the references (the LLM judge: medqa/judge.py)."""

from __future__ import annotations

import math
import re
import statistics

from medqa.store import save_figure
from medqa.train import mean_loss


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict]:
    """Per-example ROUGE-1 and ROUGE-L F1 (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    out = []
    for pred, ref in zip(predictions, references, strict=True):
        score = scorer.score(ref, pred)
        out.append({name: round(score[name].fmeasure, 4) for name in ("rouge1", "rougeL")})
    return out


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus-level BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return round(sacrebleu.corpus_bleu(predictions, [references]).score, 3)


def reference_perplexity(model, loader, plan=None) -> dict:
    """Loss and perplexity of the reference answers (a loader built with the prompt masked), in the memory
    plan's precision and micro-batches (train.plan_run's; None: the device's default)."""
    loss = mean_loss(model, loader, plan)
    return {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3)}


def summarise(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "n": len(values)} if values else {"mean": None, "median": None, "n": 0}


def score_answers(model, loader, predictions, references, plan=None) -> tuple[dict, list[dict]]:
    """Every automatic score: a summary for metrics.json and the per-example scores (`plan`: the run's memory
    plan, for the perplexity)."""
    per_example = rouge_scores(predictions, references)
    summary = {key: summarise([p[key] for p in per_example]) for key in ("rouge1", "rougeL")}
    summary["bleu"] = corpus_bleu(predictions, references)
    summary.update(reference_perplexity(model, loader, plan))
    return summary, per_example


def compare(before: dict | None, after: dict, reference_points: dict | None = None):
    """A before / after / change table of the headline scores, with a column per reference point
    (medqa.reference_points: ROUGE and BLEU only, as no model wrote those answers) when given."""
    import pandas as pd

    rows = {"ROUGE-L F1 (mean)": ("rougeL", "mean"), "ROUGE-1 F1 (mean)": ("rouge1", "mean"),
            "BLEU": ("bleu",), "reference loss": ("loss",), "reference perplexity": ("perplexity",)}

    def get(d, path):
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    table = pd.DataFrame({"after": {name: get(after, p) for name, p in rows.items()}})
    if before is not None:
        table.insert(0, "before", [get(before, p) for p in rows.values()])
        table["change"] = table["after"] - table["before"]
    for name, scores in (reference_points or {}).items():
        table[name] = [get(scores, p) for p in rows.values()]
    return table.astype(float)


# MedQuAD's question templates (X: the focus area), from the questions of the public release; `other` for the
# rest.
QUESTION_TYPES = [(template, re.compile(pattern, re.IGNORECASE)) for template, pattern in (
    ("What is (are) X ?", r"what is \(are\) "),
    ("What are the symptoms of X ?", r"what are the (signs and )?symptoms (of|for) "),
    ("What are the treatments for X ?", r"what are the treatments for "),
    ("Is X inherited ?", r"is .+ inherited ?\?"),
    ("How many people are affected by X ?", r"how many people are affected by "),
    ("What are the genetic changes related to X ?", r"what are the genetic changes related to "),
    ("What causes X ?", r"what causes "),
    ("How to diagnose X ?", r"how to diagnose "),
    ("What research (or clinical trials) is being done for X ?",
     r"what research (\(or clinical trials\) )?is being done for "),
    ("What is the outlook for X ?", r"what is the outlook for "),
    ("Who is at risk for X? ?", r"who is at risk for "),
    ("Do you have information about X", r"do you have information about "),
    ("What to do for X ?", r"what to do for "),
    ("How to prevent X ?", r"how to prevent "),
    ("What are the stages of X ?", r"what are the stages of "),
    ("What are the complications of X ?", r"what are the complications of "),
)]


def question_type(question: str) -> str:
    """The MedQuAD template a question follows, e.g. "What causes X ?", or "other"."""
    text = question.strip()
    return next((template for template, pattern in QUESTION_TYPES if pattern.match(text)), "other")


def breakdown(records: list[dict], before: list[dict] | None = None, reference_points: dict | None = None):
    """Mean ROUGE-L after (and before) fine-tuning, of the reference points, and the judge's mean where it
    judged, by source and by question type.

    `records` are test_responses.json's rows (instruction, source, rougeL and judge_score, None when
    unjudged); `before` the per-example scores of the model before fine-tuning, in the same order;
    `reference_points` the per-example scores of each reference point ({name: [...]},
    medqa.reference_points), in the same order. One row per source and per question type, with the number of
    test answers behind it, largest first. The judge's columns (its mean over the answers it scored, and how
    many) appear when it scored any.
    """
    import pandas as pd

    frame = pd.DataFrame({"source": [r.get("source") or "unknown" for r in records],
                          "question type": [question_type(r["instruction"]) for r in records],
                          "ROUGE-L after": [r["rougeL"] for r in records],
                          "judge": [r.get("judge_score") for r in records]}, dtype=object)
    columns = ["ROUGE-L after"]
    if before is not None:
        frame.insert(2, "ROUGE-L before", [b["rougeL"] for b in before])
        columns = ["ROUGE-L before", "ROUGE-L after"]
    points = [f"ROUGE-L {name}" for name in reference_points or {}]
    for column, each in zip(points, (reference_points or {}).values()):
        frame[column] = [p["rougeL"] for p in each]
    parts = []
    for by in ("source", "question type"):
        grouped = frame.groupby(by)
        part = grouped[columns].agg(lambda x: x.astype(float).mean())
        part.insert(0, "answers", grouped.size())
        if before is not None:
            part["change"] = part["ROUGE-L after"] - part["ROUGE-L before"]
        for column in points:
            part[column] = grouped[column].agg(lambda x: x.astype(float).mean())
        if frame["judge"].notna().any():
            part["judge"] = grouped["judge"].agg(lambda x: x.dropna().astype(float).mean())
            part["judged"] = grouped["judge"].agg(lambda x: int(x.notna().sum()))
        parts.append(part.sort_values("answers", ascending=False, kind="stable"))
    return pd.concat(parts, keys=["source", "question type"], names=["by", "group"])


def breakdown_rows(table) -> list[dict]:
    """The breakdown as metrics.json keeps it: one dict per row (by, group, answers, the scores; None for
    none)."""
    flat = table.reset_index()
    rows = flat.astype(object).where(flat.notna(), None).to_dict(orient="records")
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def plot_scores(after: list[float], before: list[float] | None = None, judge_scores=None, path=None):
    """Distribution of per-example ROUGE-L (and judge scores when there are any)."""
    import matplotlib.pyplot as plt

    judged = [x for x in (judge_scores or []) if x is not None]
    fig, axes = plt.subplots(1, 2 if judged else 1, figsize=(10 if judged else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    bins = [i / 20 for i in range(21)]
    if before is not None:
        ax.hist(before, bins=bins, alpha=0.6, label="before fine-tuning")
    ax.hist(after, bins=bins, alpha=0.6, label="after fine-tuning")
    ax.set_xlabel("ROUGE-L F1 per test answer")
    ax.set_ylabel("answers")
    ax.legend()
    if judged:
        axes[0][1].hist(judged, bins=range(0, 105, 5))
        axes[0][1].set_xlabel("judge score (0-100)")
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
