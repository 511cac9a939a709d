"""Reference points: answers to the test questions that need no model (`random answer`, the `nearest
question`'s answer, a `same template` answer with the disease swapped in), cut to the model's length limit and
scored as its answers are, to say what copying a training answer already earns."""

from __future__ import annotations

import random
import re

from medqa.evaluate import question_type, text_scores

NAMES = ("random answer", "nearest question", "same template")

MEANING = ("A model that beats a reference point writes answers closer to the expected ones than copying a "
           "training answer does: beating `nearest question` and `same template` means it learned more than "
           "to look up a similar question and reuse its answer.")


def random_answers(train_answers: list[str], n: int, seed: int) -> list[str]:
    """`n` training answers drawn at random (with replacement), seeded."""
    rng = random.Random(seed)
    return [rng.choice(train_answers) for _ in range(n)]


def nearest_question_answers(train_questions: list[str], train_answers: list[str],
                             test_questions: list[str]) -> list[str]:
    """For each test question, the answer of the most similar training question (the first on a tie): cosine
    similarity of TF-IDF vectors of words and word pairs, which keep some word order ("symptoms of")."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    train_vectors = vectorizer.fit_transform(train_questions)
    similarity = vectorizer.transform(test_questions) @ train_vectors.T  # rows have unit length: cosine
    return [train_answers[i] for i in similarity.toarray().argmax(axis=1)]


def swap_name(answer: str, old: str, new: str) -> str:
    """`answer` with every mention of the disease `old` (any case) replaced by `new`."""
    if not old or not new:
        return answer
    return re.sub(re.escape(old), lambda _: new, answer, flags=re.IGNORECASE)


def same_template_answers(train_rows: list[dict], test_rows: list[dict], seed: int) -> list[str]:
    """For each test row, a random training answer to a question of the same template (any training answer
    where none has it), the training row's focus_area replaced by the test row's."""
    rng = random.Random(seed)
    by_type: dict[str, list[dict]] = {}
    for row in train_rows:
        by_type.setdefault(question_type(row["instruction"]), []).append(row)
    picks = [rng.choice(by_type.get(question_type(row["instruction"])) or train_rows) for row in test_rows]
    return [swap_name(pick["output"], pick.get("focus_area") or "", row.get("focus_area") or "")
            for pick, row in zip(picks, test_rows)]


def cut_to_tokens(texts: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Each text cut to its first `max_tokens` tokens: the most the model may write (MAX_NEW_TOKENS)."""
    ids = tokenizer.encode_ordinary_batch(texts)
    return [text if len(row) <= max_tokens else tokenizer.decode(row[:max_tokens]).strip()
            for text, row in zip(texts, ids)]


def reference_answers(train_df, test_df, tokenizer, max_tokens: int, seed: int) -> dict[str, list[str]]:
    """The three reference points' answers to the test questions, each cut to `max_tokens` tokens."""
    columns = ["instruction", "output", "focus_area"]
    rows = [df[columns].to_dict(orient="records") for df in (train_df, test_df)]
    answers = {
        "random answer": random_answers(list(train_df["output"]), len(test_df), seed),
        "nearest question": nearest_question_answers(list(train_df["instruction"]), list(train_df["output"]),
                                                     list(test_df["instruction"])),
        "same template": same_template_answers(*rows, seed),
    }
    return {name: cut_to_tokens(texts, tokenizer, max_tokens) for name, texts in answers.items()}


def score_reference_points(answers: dict[str, list[str]], references: list[str]) -> tuple[dict, dict]:
    """ROUGE and BLEU of each reference point (no perplexity: no model wrote them): the summaries for
    metrics.json and the per-example scores."""
    scored = {name: text_scores(predictions, references) for name, predictions in answers.items()}
    return {name: s[0] for name, s in scored.items()}, {name: s[1] for name, s in scored.items()}


def card_table(points: dict | None) -> str:
    """The model card's lines for the reference points (Markdown), or a line saying they were not measured."""
    if not points:
        return "Reference points: not measured."
    rows = [f"| {name} | {p['rougeL']['mean']:.4g} | {p['rouge1']['mean']:.4g} | {p['bleu']:.4g} |"
            for name, p in points.items()]
    title = ("Reference points on the same test questions (answers that need no model, cut to the same "
             "length):")
    header = ["| reference point | ROUGE-L F1 | ROUGE-1 F1 | BLEU |", "|---|---|---|---|"]
    return "\n".join([title, "", *header, *rows, "", MEANING])
