import json

import pandas as pd

from medqa import data, split, split_files
from medqa.prompt_figure import draw_alpaca_figure
from medqa.prompts import PREAMBLE, format_prompt
from medqa.split import split_by_question
from tests.conftest import table


def test_prompt_without_input_has_no_input_section():
    p = format_prompt("What causes gout ?")
    assert p == f"{PREAMBLE}\n\n### Instruction:\nWhat causes gout ?\n\n### Response:\n"


def test_prompt_with_input_puts_it_between_instruction_and_response():
    p = format_prompt("Summarise.", "Gout is arthritis.")
    assert p.index("### Instruction:\nSummarise.") < p.index("### Input:\nGout is arthritis.") < p.index("### Response:")
    assert p.endswith("### Response:\n")


def _data(n=400, repeats=40):
    rows = [(f"Question {i} ?", f"answer {i}") for i in range(n)]
    rows += [(f"question {i}  ?", f"another answer {i}") for i in range(repeats)]  # same question, other case/spacing
    return table(rows)


def test_split_sizes_follow_the_fractions():
    df = _data()
    train, val, test = split_by_question(df, 0.10, 0.05, seed=1)
    assert len(train) + len(val) + len(test) == len(df)
    assert abs(len(val) - 0.10 * len(df)) <= 2 and abs(len(test) - 0.05 * len(df)) <= 2


def _related_data(n=400):
    """Rows that share answers (boilerplate) and questions spelled two ways, as MedQuAD has them."""
    rows = [(f"Question {i} ?", f"answer {i}") for i in range(n)]
    rows += [(f"What causes Cri-du-chat {i} ?", "Deletions cause it.") for i in range(30)]  # one answer, 30 questions
    rows += [(f"what causes cri du chat {i}?", f"Answer about cri du chat {i}.") for i in range(30)]  # other spelling
    rows += [(f"Is Stiff-Person {i} inherited ?", f"Stiff person {i} is not inherited.") for i in range(20)]
    rows += [(f"Is Stiff person {i} inherited ?", f"stiff-person {i} is not inherited!") for i in range(20)]
    return table(rows)


def test_split_never_puts_one_question_or_one_answer_in_two_splits():
    df = _related_data()
    for seed in range(5):
        parts = split.split_by_question(df, 0.10, 0.05, seed=seed, log=lambda *_: None)
        for column in ("instruction", "output"):
            keys = [set(p[column].map(split.same_text_key)) for p in parts]
            assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2]), (seed, column)


def test_related_groups_join_through_shared_questions_and_answers_and_count_the_rows_joined():
    df = table([("Is Stiff-Person inherited ?", "No."), ("is stiff person inherited?", "Not usually."),
                ("What causes gout ?", "Not usually."), ("What is gout ?", "Arthritis."), ("Why ?", "No!")])
    groups, stats = split.related_groups(df)
    assert groups[0] == groups[1] == groups[2] == groups[4] != groups[3]  # through the question, then the answers
    assert stats == {"rows": 5, "groups": 2, "rows joined": 4, "largest group": 4}


def test_a_group_too_large_for_the_test_share_stays_in_training():
    df = table([(f"Question {i} ?", f"answer {i}") for i in range(400)]
               + [(f"Is condition {i} inherited ?", "It is inherited in an autosomal recessive pattern.")
                  for i in range(15)])
    for seed in range(10):
        train, _, _ = split.split_by_question(df, 0.10, 0.05, seed=seed, log=lambda *_: None)
        assert train["instruction"].str.startswith("Is condition").sum() == 15


def test_the_split_says_how_many_rows_the_grouping_joined():
    lines = []
    split.split_by_question(_related_data(), 0.10, 0.05, seed=0, log=lines.append)
    assert lines == ["500 rows in 421 groups that share a question or an answer; 60 rows joined a group with "
                     "another question (largest group: 60 rows)"]


def test_splits_are_written_as_alpaca_json_that_reads_back(tmp_path):
    df = _related_data().assign(source="GHR", focus_area="Gout", prompt_ids=[[1]] * 500)
    parts = dict(zip(("train", "val", "test"), split.split_by_question(df, 0.1, 0.05, 0, log=lambda *_: None)))
    folder = split_files.save_splits(tmp_path, **parts)
    for name, part in parts.items():
        records = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
        assert list(records[0]) == ["instruction", "input", "output", "source", "focus_area"]
        pd.testing.assert_frame_equal(data.read_table(folder / f"{name}.json"), part[data.COLUMNS])


def test_split_is_reproducible_and_depends_on_the_seed():
    df = _data()
    a = split_by_question(df, 0.1, 0.05, seed=7)[2]
    b = split_by_question(df, 0.1, 0.05, seed=7)[2]
    c = split_by_question(df, 0.1, 0.05, seed=8)[2]
    pd.testing.assert_frame_equal(a, b)
    assert list(a["instruction"]) != list(c["instruction"])


def test_alpaca_figure_draws_the_four_parts():
    fig = draw_alpaca_figure()
    texts = " ".join(t.get_text() for t in fig.axes[0].texts)
    for part in ("Preamble", "### Instruction:", "### Input:", "### Response:"):
        assert part in texts


def test_a_split_that_grouping_leaves_with_too_few_examples_is_refused():
    """100 rows pass data.check_enough, but rows that share answers form groups too large for a small split."""
    import pytest

    from medqa.data import MIN_PER_SPLIT
    from medqa.errors import MedQAError

    rows = [(f"What causes condition {i} ?", f"Shared answer {i // 2}.") for i in range(94)]
    rows += [(f"What is disease {i} ?", f"Own answer {i}.") for i in range(6)]
    with pytest.raises(MedQAError, match=f"too few examples.*at least {MIN_PER_SPLIT} each"):
        split.split_by_question(table(rows), 0.10, 0.05, seed=0, log=lambda *_: None)
