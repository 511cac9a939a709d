"""Reference points: answers to the test questions that need no model (`random answer`, the `nearest
question`'s answer, a `same template` answer with the disease swapped in), cut to the model's length limit and
scored as its answers are, to say what copying a training answer already earns."""

import random
import re

from medqa.evaluate import question_type, text_scores

NAMES = ("random answer", "nearest question", "same template")

MEANING = ("A model that beats a reference point writes answers closer to the expected ones than copying a "
           "training answer does: beating `nearest question` and `same template` means it learned more than "
           "to look up a similar question and reuse its answer.")


def nearest_question_answers(train_questions: list[str], train_answers: list[str],
                             test_questions: list[str]) -> list[str]:
    """For each test question, the answer of the most similar training question (the first on a tie): cosine
    similarity of TF-IDF vectors of words and word pairs, which keep some word order ("symptoms of")."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2))
    train_vectors = vectorizer.fit_transform(train_questions)
    similarity = vectorizer.transform(test_questions) @ train_vectors.T  # rows have unit length: cosine
    return [train_answers[i] for i in similarity.toarray().argmax(axis=1)]


def same_template_answers(train_rows: list[dict], test_rows: list[dict], seed: int) -> list[str]:
    """For each test row, a random training answer to a question of the same template (any training answer
    where none has it), each mention of the training row's focus_area (any case) replaced by the test's."""
    rng = random.Random(seed)
    by_type: dict[str, list[dict]] = {}
    for row in train_rows:
        by_type.setdefault(question_type(row["instruction"]), []).append(row)
    out = []
    for row in test_rows:
        pick = rng.choice(by_type.get(question_type(row["instruction"])) or train_rows)
        old, new = pick.get("focus_area") or "", row.get("focus_area") or ""
        swapped = re.sub(re.escape(old), lambda _: new, pick["output"], flags=re.IGNORECASE)
        out.append(swapped if old and new else pick["output"])
    return out


def reference_answers(train_df, test_df, tokenizer, max_tokens: int, seed: int) -> dict[str, list[str]]:
    """The three reference points' answers to the test questions (`random answer`: drawn with replacement,
    seeded), each cut to its first `max_tokens` tokens: the most the model may write (MAX_NEW_TOKENS)."""
    rng = random.Random(seed)
    columns = ["instruction", "output", "focus_area"]
    rows = [df[columns].to_dict(orient="records") for df in (train_df, test_df)]
    train_answers = list(train_df["output"])
    answers = {
        "random answer": [rng.choice(train_answers) for _ in range(len(test_df))],
        "nearest question": nearest_question_answers(list(train_df["instruction"]), train_answers,
                                                     list(test_df["instruction"])),
        "same template": same_template_answers(*rows, seed),
    }
    ids = {name: tokenizer.encode_ordinary_batch(texts) for name, texts in answers.items()}
    return {name: [text if len(row) <= max_tokens else tokenizer.decode(row[:max_tokens]).strip()
                   for text, row in zip(texts, ids[name])] for name, texts in answers.items()}


def score_reference_points(answers: dict[str, list[str]], references: list[str]) -> tuple[dict, dict]:
    """ROUGE and BLEU of each reference point: the summaries for metrics.json and the per-example scores."""
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
