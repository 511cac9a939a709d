"""Reference points on a small fixed split whose right answers can be checked by hand."""

import pandas as pd
import pytest

from medqa import evaluate, reference_points as rp

TRAIN = pd.DataFrame({
    "instruction": ["What causes Gout ?", "What are the symptoms of Lupus ?", "Is Gout inherited ?"],
    "output": ["Gout is caused by uric acid crystals.", "Lupus causes rash and joint pain.", "Gout is not inherited."],
    "focus_area": ["Gout", "Lupus", "Gout"], "input": "", "source": "GARD"})
TEST = pd.DataFrame({
    "instruction": ["What are the symptoms of Gout ?", "Is Lupus inherited ?"],
    "output": ["Gout causes joint pain.", "Lupus is not inherited."],
    "focus_area": ["Gout", "Lupus"], "input": "", "source": "GARD"})


def test_the_nearest_training_question_gives_its_answer():
    # "What are the symptoms of Gout ?" shares five words with the Lupus question and one (gout) with the others;
    # "Is Lupus inherited ?" shares "is" and "inherited" with "Is Gout inherited ?" and only "lupus" with another.
    got = rp.nearest_question_answers(list(TRAIN["instruction"]), list(TRAIN["output"]), list(TEST["instruction"]))
    assert got == ["Lupus causes rash and joint pain.", "Gout is not inherited."]


def test_the_same_template_answer_has_the_test_questions_disease_swapped_in():
    rows = lambda df: df[["instruction", "output", "focus_area"]].to_dict(orient="records")  # noqa: E731
    got = rp.same_template_answers(rows(TRAIN), rows(TEST), seed=0)
    assert got == ["Gout causes rash and joint pain.", "Lupus is not inherited."]  # one training row per template


def test_a_template_no_training_question_has_falls_back_to_any_training_answer():
    rows = [{"instruction": "What causes Gout ?", "output": "Uric acid.", "focus_area": "Gout"}]
    assert rp.same_template_answers(rows, [{"instruction": "How to prevent Flu ?", "output": "",
                                            "focus_area": "Flu"}], seed=0) == ["Uric acid."]


def test_the_name_swap_ignores_case_and_leaves_text_without_a_name_alone():
    def swap(answer, old, new):
        train = [{"instruction": "What causes Gout ?", "output": answer, "focus_area": old}]
        return rp.same_template_answers(train, [{"instruction": "What causes Lupus ?", "focus_area": new}], 0)[0]

    assert swap("GOUT and gout: Gout.", "Gout", "Lupus") == "Lupus and Lupus: Lupus."
    assert swap("Gout (a+b).", "a+b", "x") == "Gout (x)."  # the name is text, not a pattern
    assert swap("Gout.", "", "Lupus") == "Gout."


def test_random_answers_are_training_answers_fixed_by_the_seed(tokenizer):
    train = pd.DataFrame({"instruction": [f"question {i}" for i in range(50)],
                          "output": [f"answer {i}" for i in range(50)], "focus_area": ""})
    test = train.head(20)
    first = rp.reference_answers(train, test, tokenizer, 64, seed=1)["random answer"]
    assert first == rp.reference_answers(train, test, tokenizer, 64, seed=1)["random answer"] != \
        rp.reference_answers(train, test, tokenizer, 64, seed=2)["random answer"]
    assert set(first) <= set(train["output"]) and len(set(first)) > 5


def test_answers_are_cut_to_the_models_length_limit(tokenizer):
    frame = pd.DataFrame({"instruction": ["q one", "q two"], "output": ["one two three four", "one"],
                          "focus_area": ""})
    assert rp.reference_answers(frame, frame, tokenizer, 2, seed=0)["nearest question"] == ["one two", "one"]


def test_scores_of_the_reference_points_by_hand(tokenizer):
    answers = rp.reference_answers(TRAIN, TEST, tokenizer, max_tokens=64, seed=0)
    summary, each = rp.score_reference_points(answers, list(TEST["output"]))
    # ROUGE-L F1 = 2PR / (P + R) over the longest common subsequence of words:
    # nearest question: "causes joint pain" (P 3/6, R 3/4) -> 0.6; "is not inherited" (3/4, 3/4) -> 0.75
    assert [e["rougeL"] for e in each["nearest question"]] == pytest.approx([0.6, 0.75], abs=1e-4)
    assert summary["nearest question"]["rougeL"]["mean"] == pytest.approx(0.675, abs=1e-4)
    # same template: "gout causes joint pain" (P 4/6, R 4/4) -> 0.8; the whole answer -> 1.0
    assert [e["rougeL"] for e in each["same template"]] == pytest.approx([0.8, 1.0], abs=1e-4)
    assert summary["same template"]["bleu"] == evaluate.corpus_bleu(answers["same template"], list(TEST["output"]))
    assert list(summary) == list(rp.NAMES)


def test_the_table_and_the_breakdown_show_the_reference_points_beside_the_model():
    after = {"rougeL": {"mean": 0.3}, "rouge1": {"mean": 0.4}, "bleu": 5.0, "loss": 2.0, "perplexity": 7.389}
    points = {"nearest question": {"rougeL": {"mean": 0.2}, "rouge1": {"mean": 0.25}, "bleu": 3.0}}
    table = evaluate.compare(None, after, points)
    assert list(table.columns) == ["after", "nearest question"]
    assert table.loc["ROUGE-L F1 (mean)", "nearest question"] == 0.2
    assert table["nearest question"].isna().tolist() == [False, False, False, True, True]
    records = [{"instruction": "What causes Gout ?", "source": "GARD", "rougeL": 0.4},
               {"instruction": "Is Gout inherited ?", "source": "GARD", "rougeL": 0.2}]
    parts = evaluate.breakdown(records, reference_points={"nearest question": [{"rougeL": 0.1}, {"rougeL": 0.3}]})
    assert list(parts.columns) == ["answers", "ROUGE-L after", "ROUGE-L nearest question"]
    assert parts.loc[("source", "GARD")].tolist() == pytest.approx([2, 0.3, 0.2])
    rows = evaluate.breakdown_rows(parts)
    assert rows[0] == {"by": "source", "group": "GARD", "answers": 2, "ROUGE-L after": 0.3,
                       "ROUGE-L nearest question": 0.2}
    assert type(rows[0]["answers"]) is int  # JSON-ready


def test_the_model_card_lines_say_what_beating_them_means():
    points = {"random answer": {"rougeL": {"mean": 0.1}, "rouge1": {"mean": 0.15}, "bleu": 1.5}}
    lines = rp.card_table(points)
    assert "| random answer | 0.1 | 0.15 | 1.5 |" in lines and rp.MEANING in lines
    assert rp.card_table(None) == "Reference points: not measured."
