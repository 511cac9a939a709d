"""Step 12: how good are the answers? ROUGE, BLEU, perplexity of the references (the LLM judge: medqa/judge.py)."""

from __future__ import annotations

import math
import statistics

from medqa.train import mean_loss


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict]:
    """Per-example ROUGE-1 and ROUGE-L F1 (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    out = []
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.score(ref, pred)
        out.append({"rouge1": round(s["rouge1"].fmeasure, 4), "rougeL": round(s["rougeL"].fmeasure, 4)})
    return out


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus-level BLEU (sacrebleu, 0-100)."""
    import sacrebleu

    return round(sacrebleu.corpus_bleu(predictions, [references]).score, 3)


def reference_perplexity(model, loader, device) -> dict:
    """Loss and perplexity of the reference answers (a loader built with the prompt masked)."""
    loss = mean_loss(model, loader, device)
    return {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3)}


def summarise(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "n": len(values)} if values else {"mean": None, "median": None, "n": 0}


def score_answers(model, loader, device, predictions, references) -> tuple[dict, list[dict]]:
    """Every automatic score: a summary for metrics.json and the per-example scores."""
    per_example = rouge_scores(predictions, references)
    summary = {key: summarise([p[key] for p in per_example]) for key in ("rouge1", "rougeL")}
    summary["bleu"] = corpus_bleu(predictions, references)
    summary.update(reference_perplexity(model, loader, device))
    return summary, per_example


def compare(before: dict | None, after: dict):
    """A before / after / change table of the headline scores."""
    import pandas as pd

    rows = {"ROUGE-L F1 (mean)": ("rougeL", "mean"), "ROUGE-1 F1 (mean)": ("rouge1", "mean"),
            "BLEU": ("bleu",), "reference loss": ("loss",), "reference perplexity": ("perplexity",)}

    def get(d, path):
        for k in path:
            d = d[k]
        return d

    table = pd.DataFrame({"after": {name: get(after, p) for name, p in rows.items()}})
    if before is not None:
        table.insert(0, "before", [get(before, p) for p in rows.values()])
        table["change"] = table["after"] - table["before"]
    return table


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
        fig.savefig(path, dpi=110)
    return fig
