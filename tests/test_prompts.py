import pandas as pd

from medqa.prompts import PREAMBLE, draw_alpaca_figure, format_prompt, split_by_question
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


def test_split_never_puts_one_question_in_two_splits():
    df = _data()
    parts = split_by_question(df, 0.10, 0.05, seed=3)
    keys = [set(p["instruction"].str.lower().str.split().str.join(" ")) for p in parts]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


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
