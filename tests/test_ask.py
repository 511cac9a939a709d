"""python -m medqa.ask: the notebook's answers from a saved folder, its decoding by default, one clear error line."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from medqa import ask, export, generate, prompts
from tests.test_export import QUESTIONS, ending_model, smoke  # noqa: F401 - ending_model is a fixture


@pytest.fixture(scope="module")
def folder(ending_model, tmp_path_factory):  # noqa: F811
    return export.save_model_folder(ending_model, tmp_path_factory.mktemp("run") / "model", smoke())


def notebook_answers(model, tokenizer, questions, s):
    return generate.answer(model, tokenizer, [tokenizer.encode_ordinary(prompts.format_prompt(q)) for q in questions],
                           generate.Decoding.from_settings(s))


def asked(capsys, *argv):
    rc = ask.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_ask_gives_the_notebooks_answers(folder, ending_model, tokenizer, tmp_path, capsys):  # noqa: F811
    questions = tmp_path / "q.txt"
    questions.write_text("\n".join(QUESTIONS[2:]) + "\n\n", encoding="utf-8")
    rc, out, err = asked(capsys, "--model", folder, *QUESTIONS[:2], "--file", questions, "--json")
    assert rc == 0 and "Not medical advice" in err
    got = json.loads(out)
    assert [g["question"] for g in got] == QUESTIONS
    expected = notebook_answers(ending_model, tokenizer, QUESTIONS, smoke())
    assert [g["answer"] for g in got] == expected
    # the answers differ, and some ended at <|endoftext|>, before the 24 tokens
    assert len(set(expected)) > 2 and min(len(tokenizer.encode_ordinary(a)) for a in expected) < 12
    rc, out, _ = asked(capsys, "--model", folder, *QUESTIONS[:2])
    assert out == "".join(f"Q: {q}\nA: {a}\n\n" for q, a in zip(QUESTIONS[:2], expected[:2]))


def test_ask_answers_in_batches_as_the_notebook_does(folder, ending_model, tokenizer, capsys):  # noqa: F811
    rc, out, err = asked(capsys, "--model", folder, *QUESTIONS, "--batch-size", 2, "--json")
    assert rc == 0 and "answering" in err  # the progress bar of more than one batch
    expected = notebook_answers(ending_model, tokenizer, QUESTIONS, replace(smoke(), GEN_BATCH_SIZE=2))
    assert [g["answer"] for g in json.loads(out)] == expected



def test_sampled_answers_in_several_batches_are_the_notebooks(folder, ending_model, tokenizer, capsys):  # noqa: F811
    """One seed for the whole call, as the notebook's: not one re-seeding per batch of questions."""
    rc, out, _ = asked(capsys, "--model", folder, *QUESTIONS, "--batch-size", 2, "--temperature", 1.5, "--json")
    assert rc == 0
    sampled = replace(smoke(), GEN_BATCH_SIZE=2, TEMPERATURE=1.5)
    assert [g["answer"] for g in json.loads(out)] == notebook_answers(ending_model, tokenizer, QUESTIONS, sampled)

def test_ask_decodes_as_the_folder_says_unless_told_otherwise(ending_model, tokenizer, tmp_path, capsys):  # noqa: F811
    short = smoke(MAX_NEW_TOKENS=3, REPETITION_PENALTY=1.3, NO_REPEAT_NGRAM_SIZE=2)
    folder = export.save_model_folder(ending_model, tmp_path / "model", short)
    _, out, _ = asked(capsys, "--model", folder, *QUESTIONS, "--json")
    assert [g["answer"] for g in json.loads(out)] == notebook_answers(ending_model, tokenizer, QUESTIONS, short)
    _, out, _ = asked(capsys, "--model", folder, *QUESTIONS, "--json", "--max-new-tokens", 24,
                      "--repetition-penalty", 1.0, "--no-repeat-ngram-size", 3)
    assert [g["answer"] for g in json.loads(out)] == notebook_answers(ending_model, tokenizer, QUESTIONS, smoke())


@pytest.mark.parametrize("case, words", [
    ("missing folder", ["nope", "no such folder", "OUTPUT_DIR/model"]),
    ("not a model folder", ["holds no saved model", "not at OUTPUT_DIR itself"]),
    ("empty file", ["empty.txt", "holds no question"]),
    ("missing file", ["absent.txt", "no such file"]),
    ("no question", ["No question given", "--file"]),
    ("bad number", ["--max-new-tokens 0", "above 0"]),
])
def test_bad_input_gets_one_clear_line_and_exit_2(case, words, folder, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    argv = {"missing folder": ["--model", tmp_path / "nope", "q?"],
            "not a model folder": ["--model", folder.parent, "q?"],
            "empty file": ["--model", folder, "--file", tmp_path / "empty.txt"],
            "missing file": ["--model", folder, "--file", tmp_path / "absent.txt"],
            "no question": ["--model", folder, "  "],
            "bad number": ["--model", folder, "q?", "--max-new-tokens", 0]}[case]
    rc, out, err = asked(capsys, *argv)
    assert rc == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1
    for w in words:
        assert w in err


def test_the_command_runs_and_explains_itself(tmp_path):
    helped = subprocess.run([sys.executable, "-m", "medqa.ask", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--model" in helped.stdout and "--file" in helped.stdout
    failed = subprocess.run([sys.executable, "-m", "medqa.ask", "--model", str(tmp_path / "gone"), "q?"],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.startswith("error: --model") and "Traceback" not in failed.stderr


def test_a_question_too_long_for_the_context_is_refused_never_cut(folder, capsys):
    """A 20,000-word question was cut from the left to the context, preamble first, and got a 1-token answer."""
    rc, out, err = asked(capsys, "--model", folder, "What are the symptoms of glaucoma? " + "eye " * 20_000)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "question 1 has 20" in err and "reads 1024 tokens in all" in err and "Shorten it" in err
    assert "--max-new-tokens 24" in err and "lower --max-new-tokens" not in err  # no answer fits beside it


def test_a_question_that_leaves_less_than_the_answers_room_says_which_fix_helps(folder, tokenizer, capsys):
    frame = len(tokenizer.encode_ordinary(prompts.format_prompt("")))
    question = " ".join(["eye"] * (1024 - frame - 10))  # about 10 tokens left: less than the folder's 24
    left = 1024 - len(tokenizer.encode_ordinary(prompts.format_prompt(question)))
    assert 0 < left < 24
    rc, _, err = asked(capsys, "--model", folder, "How is gout treated?", question)
    assert rc == 2 and "question 2 has" in err and f"lower --max-new-tokens to {left}" in err
    assert "question 1" not in err
    rc, out, _ = asked(capsys, "--model", folder, question, "--max-new-tokens", left)
    assert rc == 0 and out.startswith("Q: eye eye")
    rc, _, err = asked(capsys, "--model", folder, "How is gout treated?", "--max-new-tokens", 5000)
    assert rc == 2 and "--max-new-tokens 5000 a question can have at most 0 tokens" in err


def test_an_answer_longer_than_the_context_names_the_only_fix(folder, tokenizer, capsys):
    """--max-new-tokens 5000 on a 1024-token model: no question fits, so "Shorten it" would mislead."""
    left = 1024 - len(tokenizer.encode_ordinary(prompts.format_prompt("How is gout treated?")))
    rc, _, err = asked(capsys, "--model", folder, "How is gout treated?", "--max-new-tokens", 5000)
    assert rc == 2 and "Shorten" not in err and f"Lower --max-new-tokens to {left} or less" in err


@pytest.mark.parametrize("flags, said", [
    (["--repetition-penalty", "inf"], "--repetition-penalty inf: must be a finite number, 1.0 or above."),
    (["--temperature", "nan"], "--temperature nan: must be a finite number, 0 or above."),
    (["--repetition-penalty", "0.5"], "--repetition-penalty 0.5: must be a finite number, 1.0 or above.")])
def test_a_bad_decoding_flag_is_named_as_given(folder, capsys, flags, said):
    rc, out, err = asked(capsys, "--model", folder, "What is gout?", *flags)
    assert rc == 2 and said in err
