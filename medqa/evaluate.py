"""How good are the answers? ROUGE, BLEU, perplexity of the references (the LLM judge: medqa/judge.py)."""

import math
import re
import statistics
import warnings
from pathlib import Path

import regex

from medqa import store
from medqa.errors import MedQAError
from medqa.train import mean_loss

# Scripts written without spaces between words: each character is one token.
_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
_OTHER = rf"[[\p{{L}}\p{{M}}\p{{Nd}}]--\p{{Latin}}--\p{{Common}}--\p{{Inherited}}--[{_UNSPACED}]]"
_EMOJI = r"[\p{Emoji_Presentation}\p{Emoji_Modifier}]"
# A token of lower-cased text: a character of a script without spaces; a run of ASCII letters and digits, as
# rouge-score takes English (accented Latin letters split words there too); a word of another script; emoji.
TOKEN = regex.compile(rf"(?V1)[{_UNSPACED}]|[a-z0-9]+|{_OTHER}+|{_EMOJI}")
SEEN_ENOUGH = 0.5  # below this share of the references' characters, the scores say they see little


class AnyScriptTokenizer:
    """rouge-score's tokenizer for any script (its own keeps only [a-z0-9]): TOKEN's tokens of the lower-cased
    text, ASCII words longer than three letters Porter-stemmed, so that English gets rouge-score's tokens."""

    def __init__(self):
        from nltk.stem import porter

        self._stem = porter.PorterStemmer().stem

    def tokenize(self, text: str) -> list[str]:
        """The tokens of `text`, as rouge-score compares them."""
        return [self._stem(t) if len(t) > 3 and t.isascii() else t for t in TOKEN.findall(text.lower())]


def rouge_scores(predictions: list[str], references: list[str]) -> list[dict]:
    """Per-example ROUGE-1 and ROUGE-L F1 (rouge-score with AnyScriptTokenizer)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], tokenizer=AnyScriptTokenizer())
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return [{name: round(score[name].fmeasure, 4) for name in ("rouge1", "rougeL")} for score in scores]


def bleu_tokenizer(references: list[str]) -> str:
    """sacrebleu's tokenizer for the references' script: "13a" for text mostly in ASCII letters, "zh" for
    Chinese, "char" for other scripts without spaces, "intl" for the rest."""
    text = "".join(references)
    letters = max(len(regex.findall(r"\p{L}", text)), 1)
    unspaced = len(regex.findall(f"[{_UNSPACED}]", text)) / letters
    if unspaced >= 0.1:
        return "zh" if len(regex.findall(r"\p{Han}", text)) / letters >= unspaced / 2 else "char"
    return "intl" if len(regex.findall(r"[^\x00-\x7f]", text)) / letters >= 0.1 else "13a"


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """Corpus-level BLEU (sacrebleu, 0-100), tokenized for the references' script (bleu_tokenizer)."""
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize=bleu_tokenizer(references))
    return round(bleu.score, 3)


def text_seen(references: list[str]) -> float:
    """The share of the references' characters (spaces aside) inside the tokens that ROUGE compares."""
    seen = sum(len(t) for text in references for t in TOKEN.findall(text.lower()))
    return seen / max(sum(len("".join(text.split())) for text in references), 1)


def reference_perplexity(model, loader, plan=None) -> dict:
    """Loss and perplexity of the reference answers (a prompt-masked loader), in the plan's precision."""
    loss = mean_loss(model, loader, plan)
    return {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 50)), 3)}


def summarise(values: list[float]) -> dict:
    """Mean, median and number of `values` (None for an empty list), rounded for metrics.json."""
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "n": len(values)} if values else {"mean": None, "median": None, "n": 0}


def text_scores(predictions: list[str], references: list[str]) -> tuple[dict, list[dict]]:
    """ROUGE and BLEU: their summary (a "note" and a warning where they see little) and per-example ROUGE."""
    per_example = rouge_scores(predictions, references)
    summary = {key: summarise([p[key] for p in per_example]) for key in ("rouge1", "rougeL")}
    summary["bleu"] = corpus_bleu(predictions, references)
    share = text_seen(references)
    if share < SEEN_ENOUGH:
        summary["note"] = (f"ROUGE and BLEU see only {share:.0%} of the reference answers' characters: the "
                           "rest (punctuation, symbols, or Latin letters with accents, which English "
                           "tokenizing splits off) they do not compare, so these scores say little about "
                           "these answers.")
        warnings.warn(summary["note"], stacklevel=2)
    return summary, per_example


def score_answers(model, loader, predictions, references, plan=None) -> tuple[dict, list[dict]]:
    """Every automatic score: a summary for metrics.json and the per-example scores."""
    summary, per_example = text_scores(predictions, references)
    summary.update(reference_perplexity(model, loader, plan))
    return summary, per_example


def record_before(out, records: list[dict], summary: dict, log=print) -> tuple[dict, list[dict]]:
    """Record the model before fine-tuning: `records` (its scored answers) into base_responses.json and
    `summary` into metrics.json's evaluation.before, while `out` has no checkpoint and no loss history. Once
    training has started the model may hold trained weights: the record kept from before is used (and said
    so), or, with none kept, refused. Returns the summary and the per-example ROUGE the run goes on with."""
    out = Path(out)
    metrics = out / "metrics.json"
    redo = ("To measure the untrained model again, set OUTPUT_DIR to a new folder (or delete this run's "
            "folder) and run the notebook from the top.")
    started = (out / "checkpoint.pt").exists() or metrics.exists() and "history" in store.read_json(
        metrics, "Delete it, or choose another OUTPUT_DIR.")
    if not started:
        store.write_json_atomic(out / "base_responses.json", records)
        store.update_json(metrics, lambda m: m.setdefault("evaluation", {}).update(before=summary))
        kept, kept_summary = records, summary
    else:
        kept_summary = (store.read_json(metrics, "").get("evaluation", {}).get("before") if metrics.exists()
                        else None)
        if kept_summary is None or not (out / "base_responses.json").exists():
            raise MedQAError(f"Training has started in OUTPUT_DIR={str(out)!r}, so this model's answers are "
                             f"not the untrained model's, and no record from before training is kept there: "
                             f"nothing is recorded as 'before fine-tuning'. {redo}")
        kept = store.read_json(out / "base_responses.json", f"Delete it and {redo[0].lower()}{redo[1:]}")
        log("Training has started in OUTPUT_DIR, so the model may hold trained weights: base_responses.json "
            f"and evaluation.before keep the record from before training, which is used here. {redo}")
    return kept_summary, [{key: r[key] for key in ("rouge1", "rougeL")} for r in kept]


def compare(before: dict | None, after: dict, reference_points: dict | None = None):
    """A before / after / change table of the headline scores, and a column per reference point if given."""
    import pandas as pd

    rows = {"ROUGE-L F1 (mean)": ("rougeL", "mean"), "ROUGE-1 F1 (mean)": ("rouge1", "mean"),
            "BLEU": ("bleu",), "reference loss": ("loss",), "reference perplexity": ("perplexity",)}

    def get(d, path):
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    columns = {"before": before} if before is not None else {}
    columns.update({"after": after, **(reference_points or {})})
    table = pd.DataFrame({name: [get(scores, p) for p in rows.values()] for name, scores in columns.items()},
                         index=list(rows))
    if before is not None:
        table.insert(2, "change", table["after"] - table["before"])
    return table.astype(float)


# MedQuAD's question templates (X: the focus area), from the public release's questions: a question follows
# one when it starts as the template does before X (any case), or matches its pattern here; else `other`.
_PATTERNS = {"What are the symptoms of X ?": r"what are the (signs and )?symptoms (of|for) ",
             "Is X inherited ?": r"is .+ inherited ?\?",
             "What research (or clinical trials) is being done for X ?":
                 r"what research (\(or clinical trials\) )?is being done for "}
_TEMPLATES = ("What is (are) X ?", "What are the symptoms of X ?", "What are the treatments for X ?",
              "Is X inherited ?", "How many people are affected by X ?",
              "What are the genetic changes related to X ?", "What causes X ?", "How to diagnose X ?",
              "What research (or clinical trials) is being done for X ?", "What is the outlook for X ?",
              "Who is at risk for X? ?", "Do you have information about X", "What to do for X ?",
              "How to prevent X ?", "What are the stages of X ?", "What are the complications of X ?")
QUESTION_TYPES = [(t, re.compile(_PATTERNS.get(t) or re.escape(t.split("X")[0]), re.IGNORECASE))
                  for t in _TEMPLATES]


def question_type(question: str) -> str:
    """The MedQuAD template a question follows, e.g. "What causes X ?", or "other"."""
    text = question.strip()
    return next((template for template, pattern in QUESTION_TYPES if pattern.match(text)), "other")


def breakdown(records: list[dict], before: list[dict] | None = None, reference_points: dict | None = None):
    """Mean ROUGE-L after and before fine-tuning, of each reference point, and the judge's where it judged, by
    source and by question type, largest first; `before` and `reference_points` in the order of `records`."""
    import pandas as pd

    frame = pd.DataFrame({"source": [r.get("source") or "unknown" for r in records],
                          "question type": [question_type(r["instruction"]) for r in records],
                          "ROUGE-L after": [r["rougeL"] for r in records],
                          "judge": [r.get("judge_score") for r in records]}, dtype=object)
    columns = ["ROUGE-L after"]
    if before is not None:
        frame["ROUGE-L before"] = [b["rougeL"] for b in before]
        columns.insert(0, "ROUGE-L before")
    for name, each in (reference_points or {}).items():
        frame[f"ROUGE-L {name}"] = [p["rougeL"] for p in each]
        columns.append(f"ROUGE-L {name}")
    parts = []
    for by in ("source", "question type"):
        grouped = frame.groupby(by)
        part = grouped[columns].agg(lambda x: x.astype(float).mean())
        part.insert(0, "answers", grouped.size())
        if before is not None:
            part.insert(3, "change", part["ROUGE-L after"] - part["ROUGE-L before"])
        if frame["judge"].notna().any():
            part["judge"] = grouped["judge"].agg(lambda x: x.dropna().astype(float).mean())
            part["judged"] = grouped["judge"].agg(lambda x: int(x.notna().sum()))
        parts.append(part.sort_values("answers", ascending=False, kind="stable"))
    return pd.concat(parts, keys=["source", "question type"], names=["by", "group"])


def breakdown_rows(table) -> list[dict]:
    """The breakdown as metrics.json keeps it: one dict per row, floats rounded, None for none."""
    flat = table.reset_index()
    rows = flat.astype(object).where(flat.notna(), None).to_dict(orient="records")
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def plot_scores(after: list[float], before: list[float] | None = None, judge_scores=None, path=None):
    """Distribution of per-example ROUGE-L (and judge scores when there are any)."""
    import matplotlib.pyplot as plt

    judged = [x for x in (judge_scores or []) if x is not None]
    fig, axes = plt.subplots(1, 2 if judged else 1, figsize=(10 if judged else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    for label, values in (("before", before), ("after", after)):
        if values is not None:
            ax.hist(values, bins=[i / 20 for i in range(21)], alpha=0.6, label=f"{label} fine-tuning")
    ax.set(xlabel="ROUGE-L F1 per test answer", ylabel="answers")
    ax.legend()
    if judged:
        axes[0][1].hist(judged, bins=range(0, 105, 5))
        axes[0][1].set_xlabel("judge score (0-100)")
    fig.tight_layout()
    if path is not None:
        store.save_figure(fig, path)
    return fig
