"""The sentences under the notebook's results (medqa/readings.py) follow the numbers they are given, and the
answers are printed whole."""

import math

from medqa import readings

REFERENCE = {"random answer": {"rougeL": {"mean": 0.099}, "rouge1": {"mean": 0.142}, "bleu": 0.191},
             "nearest question": {"rougeL": {"mean": 0.148}, "rouge1": {"mean": 0.207}, "bleu": 0.622},
             "same template": {"rougeL": {"mean": 0.178}, "rouge1": {"mean": 0.232}, "bleu": 0.982}}


def test_the_verdict_says_which_reference_points_the_model_beats_per_score():
    after = {"rougeL": {"mean": 0.155}, "rouge1": {"mean": 0.2071}, "bleu": 0.868}
    lines = readings.verdict(after, REFERENCE).splitlines()
    assert lines == [
        "ROUGE-L F1 (0–1): the model's 0.155 beats random answer (0.099) and nearest question (0.148); "
        "loses to same template (0.178).",
        "ROUGE-1 F1 (0–1): the model's 0.207 beats random answer (0.142); ties with nearest question (0.207); "
        "loses to same template (0.232).",
        "BLEU (0–100): the model's 0.868 beats random answer (0.191) and nearest question (0.622); "
        "loses to same template (0.982)."]
    better = {"rougeL": {"mean": 0.2}, "rouge1": {"mean": 0.3}, "bleu": 2.0}
    assert all("loses" not in line for line in readings.verdict(better, REFERENCE).splitlines())


def test_every_score_is_labelled_with_its_scale():
    assert readings.with_scale("ROUGE-L F1 (mean)") == "ROUGE-L F1 (mean), 0–1"
    assert readings.with_scale("BLEU") == "BLEU, 0–100"
    assert readings.with_scale("reference loss") == "reference loss, nats per token"
    assert readings.with_scale("reference perplexity") == "reference perplexity"


def test_the_first_loss_is_read_against_ln_of_the_vocabulary():
    near = readings.first_loss(10.851, 50257)
    assert f"ln(50,257) = {math.log(50257):.3f}" in near and "0.03 above" in near and "evenly" in near
    assert "7.62 below" in readings.first_loss(3.2, 50257)


def test_the_loss_curve_is_read_from_its_first_and_last_points():
    history = [{"step": 40, "train_loss": 7.9, "val_loss": 6.6}, {"step": 80, "train_loss": 6.1, "val_loss": 5.9},
               {"step": 120, "train_loss": 5.0, "val_loss": 5.95}]
    text = readings.loss_curve(history)
    assert "step 40 to step 120" in text and "from 7.90 to 5.00" in text and "from 6.60 to 5.95" in text
    assert "lowest 5.90, at step 80" in text and "0.95 above the train loss" in text and "mean over" in text
    rising = readings.loss_curve([dict(history[0], val_loss=5.0), history[-1]])
    assert "validation loss rose from 5.00 to 5.95" in rising


def test_empty_answers_are_counted_and_what_the_model_wrote_is_said(tokenizer):
    prompts = [[1, 198], [2, 198], [3, 198], [4]]
    new_ids = [[198, 198, 198], [], [464, 3290], [198]]
    text = readings.empty_answers(new_ids, prompts, tokenizer)
    assert text == ("3 of the 4 answers are empty: 1 end at once with <|endoftext|>; 2 hold only blanks, which "
                    "the answer's cleaning strips: most often '\\n' (token 198), and in 1 of them the first "
                    "token is the prompt's last one repeated. 3 of the 6 tokens written repeat the token just "
                    "before them.")
    assert readings.empty_answers([[464, 464, 11]], [[1]], tokenizer) == (
        "None of the 1 answers is empty. 1 of the 3 tokens written repeat the token just before them.")


def test_answers_are_printed_whole(capsys):
    long = " ".join(f"word{i}" for i in range(300))
    readings.print_answers([{"instruction": "Q?", "output": long + "\n- a second line", "model_response": "",
                             "rougeL": 0.25}])
    shown = capsys.readouterr().out
    assert " ".join(shown.replace("expected", "").split()).count("word299 - a second line") == 1
    assert "(empty)" in shown and "ROUGE-L 0.250" in shown
    assert max(len(line) for line in shown.splitlines()) <= 108
