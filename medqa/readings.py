"""What the notebook says under its results, computed from the numbers; answers printed whole."""

import math
import textwrap
from collections import Counter

from medqa.generate import clean_answer

SCALES = {"ROUGE": "0–1", "BLEU": "0–100", "reference loss": "nats per token"}
SCORES = {"rougeL": "ROUGE-L F1 (0–1)", "rouge1": "ROUGE-1 F1 (0–1)", "bleu": "BLEU (0–100)"}


def with_scale(label: str) -> str:
    """A score's name with its scale: ROUGE is on 0–1, BLEU on 0–100."""
    return next((f"{label}, {scale}" for start, scale in SCALES.items() if label.startswith(start)), label)


def first_loss(loss: float, vocab_size: int) -> str:
    """The loss before training beside ln(vocabulary), the loss of a model that guesses every token evenly."""
    even = math.log(vocab_size)
    gap = loss - even
    why = ("its weights spread the probability almost evenly over the vocabulary" if abs(gap) < 0.5
           else "it is sure of wrong tokens" if gap > 0 else "it already gives the next token more than that")
    return (f"Loss before fine-tuning: {loss:.3f} per token. A model that gives each of the {vocab_size:,} "
            f"tokens probability 1/{vocab_size:,} has loss ln({vocab_size:,}) = {even:.3f}; this one is "
            f"{abs(gap):.2f} {'above' if gap > 0 else 'below'} it: {why}.")


def loss_curve(history: list[dict]) -> str:
    """The curve's first and last points, and what each kind of point measures."""
    first, last = history[0], history[-1]
    low = min(history, key=lambda h: h["val_loss"])
    moved = {k: "fell" if last[k] < first[k] else "rose" for k in ("train_loss", "val_loss")}
    gap = last["val_loss"] - last["train_loss"]
    return (f"From step {first['step']} to step {last['step']} the train loss {moved['train_loss']} from "
            f"{first['train_loss']:.2f} to {last['train_loss']:.2f} and the validation loss "
            f"{moved['val_loss']} from {first['val_loss']:.2f} to {last['val_loss']:.2f} (lowest "
            f"{low['val_loss']:.2f}, at step {low['step']}). Each train point is the mean over the steps "
            "since the point before, while the weights changed; each validation point is measured at its "
            f"step, on the same validation sample. At the end the validation loss is {abs(gap):.2f} "
            f"{'above' if gap > 0 else 'below'} the train "
            f"loss{': the model fits the answers it trained on better than new ones' if gap > 0 else ''}.")


def verdict(after: dict, reference: dict) -> str:
    """Per score, which reference points the model beats and which it loses to (at the table's 3 decimals)."""
    def mean(scores, key):
        return round(scores[key]["mean"] if isinstance(scores[key], dict) else scores[key], 3)

    lines = []
    for key, label in SCORES.items():
        mine = mean(after, key)
        groups = {"beats": [], "ties with": [], "loses to": []}
        for name, scores in reference.items():
            theirs = mean(scores, key)
            word = "beats" if mine > theirs else "ties with" if mine == theirs else "loses to"
            groups[word].append(f"{name} ({theirs:.3f})")
        said = [f"{word} {' and '.join(names)}" for word, names in groups.items() if names]
        lines.append(f"{label}: the model's {mine:.3f} {'; '.join(said)}.")
    return "\n".join(lines)


def empty_answers(new_ids: list[list[int]], prompts: list[list[int]], tokenizer) -> str:
    """How many answers are empty, and what the model wrote instead (<|endoftext|> at once, or only blanks);
    how many of the tokens it wrote repeat the token just before them (the prompt's last, for the first)."""
    empty = [(ids, p) for ids, p in zip(new_ids, prompts) if not clean_answer(tokenizer.decode(ids))]
    total = sum(len(ids) for ids in new_ids)
    repeats = sum(a == b for ids, p in zip(new_ids, prompts) for a, b in zip(p[-1:] + ids, ids))
    echoed = (f" {repeats:,} of the {total:,} tokens written repeat the token just before them." if total
              else "")
    if not empty:
        return f"None of the {len(new_ids)} answers is empty.{echoed}"
    blank = [(ids, p) for ids, p in empty if ids]
    said = [f"{len(empty) - len(blank)} end at once with <|endoftext|>"] if len(blank) < len(empty) else []
    if blank:
        token = Counter(t for ids, _ in blank for t in ids).most_common(1)[0][0]
        echo = sum(ids[0] == p[-1] for ids, p in blank)
        said.append(f"{len(blank)} hold only blanks, which the answer's cleaning strips: most often "
                    f"{tokenizer.decode([token])!r} (token {token}), and in {echo} of them the first token "
                    f"is the prompt's last one repeated")
    return f"{len(empty)} of the {len(new_ids)} answers are empty: {'; '.join(said)}.{echoed}"


def print_answers(records: list[dict], width: int = 108) -> None:
    """Each question with its expected and model answer, whole, wrapped to `width` (and ROUGE-L if scored)."""
    for i, rec in enumerate(records, 1):
        print(f"{i}. {rec['instruction']}")
        for label, text in (("expected", rec["output"]), ("model", rec["model_response"] or "(empty)")):
            for n, line in enumerate(text.splitlines() or [""]):
                start = f"   {label if n == 0 else '':<9} "
                print(textwrap.fill(line, width, initial_indent=start, subsequent_indent=" " * 13))
        print(f"   ROUGE-L {rec['rougeL']:.3f}\n" if "rougeL" in rec else "")
