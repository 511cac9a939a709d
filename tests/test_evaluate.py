"""Scoring helpers on hand-made pairs (the Ollama judge: tests/test_judge.py)."""

import pytest
import torch

from medqa import batches, evaluate
from medqa.batches import IGNORE
from medqa.hardware import Plan
from tests import fp32


# ---------------------------------------------------------------- automatic scores

def test_identical_text_scores_full_marks():
    assert evaluate.rouge_scores(["Gout is a form of arthritis."], ["Gout is a form of arthritis."]) == \
        [{"rouge1": 1.0, "rougeL": 1.0}]
    assert evaluate.corpus_bleu(["Gout is a form of arthritis ."], ["Gout is a form of arthritis ."]) == 100.0


def test_disjoint_text_scores_zero():
    assert evaluate.rouge_scores(["purple elephants dance"], ["gout is arthritis"]) == [{"rouge1": 0.0, "rougeL": 0.0}]
    assert evaluate.corpus_bleu(["purple elephants dance"], ["gout is arthritis"]) == 0.0


def test_partial_overlap():
    [s] = evaluate.rouge_scores(["the cat lay on the rug"], ["the cat sat on the mat"])
    assert s["rouge1"] == pytest.approx(4 / 6, abs=1e-4)  # the, the, cat, on
    [s] = evaluate.rouge_scores(["on the mat the cat sat"], ["the cat sat on the mat"])
    assert s["rouge1"] == 1.0 and s["rougeL"] == pytest.approx(0.5, abs=1e-4)  # LCS "the cat sat"
    [s] = evaluate.rouge_scores(["symptoms include running noses"], ["symptom includes runs nose"])
    assert s["rouge1"] == 1.0  # stemming
    assert 0 < evaluate.corpus_bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) < 100


def test_summary_and_the_before_after_table():
    assert evaluate.summarise([0.1, 0.2, 0.6]) == {"mean": 0.3, "median": 0.2, "n": 3}
    after = {"rougeL": {"mean": 0.3}, "rouge1": {"mean": 0.4}, "bleu": 5.0, "loss": 2.0, "perplexity": 7.389}
    before = {"rougeL": {"mean": 0.1}, "rouge1": {"mean": 0.1}, "bleu": 1.0, "loss": 3.0, "perplexity": 20.09}
    table = evaluate.compare(before, after)
    assert list(table.columns) == ["before", "after", "change"]
    assert table.loc["ROUGE-L F1 (mean)", "change"] == pytest.approx(0.2)
    assert list(evaluate.compare(None, after).columns) == ["after"]


@pytest.mark.numerics
def test_reference_perplexity_counts_answer_tokens_only(tiny_model):
    prompt, answer = [10, 11, 12, 13], [20, 21, 22]
    loader = batches.make_loader(batches.QADataset(_frame([(prompt, answer)]), 64), 1, 64, shuffle=False,
                                 mask_prompt=True)
    got = evaluate.reference_perplexity(tiny_model, loader, Plan("fp32"))  # the reference below is fp32
    ids = torch.tensor([prompt + answer + [50256]])
    labels = ids.clone()
    labels[0, : len(prompt)] = IGNORE  # Hugging Face shifts labels itself
    tiny_model.eval()
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, labels=labels).loss.item()
    # the loss is recorded to 4 decimals (5e-5), and both ways sum 4 targets' log-sum-exps over the vocabulary
    bound = 5e-5 + 2 * fp32.sum_bound(len(answer + [50256]) * tiny_model.config.vocab_size) * expected
    assert got["loss"] == pytest.approx(expected, abs=bound)
    # exp of the unrounded loss, to 3 decimals: the 4-decimal loss moves it by 5e-5 relative, its own rounding
    # by 5e-4 / perplexity
    assert got["perplexity"] == pytest.approx(2.718281828 ** got["loss"], rel=5e-5 + 5e-4 / got["perplexity"])


def _frame(pairs):
    import pandas as pd

    return pd.DataFrame({"prompt_ids": [p for p, _ in pairs], "answer_ids": [a for _, a in pairs]})


# ---------------------------------------------------------------- scores by source and question type

def test_questions_are_typed_by_medquads_templates():
    types = [evaluate.question_type(q) for q in (
        "What is (are) Cri-du-chat syndrome ?", "what are the symptoms of Gout ?", "What causes Gout ?",
        "Is Stiff person syndrome inherited ?", "What research (or clinical trials) is being done for Stroke ?",
        "what research (or clinical trials) is being done for Breast Cancer ?", "Who is at risk for Gout? ?",
        "How to diagnose Kidney Stones ?", "Do you have information about Anemia", "how is rabies diagnosed?")]
    assert types == ["What is (are) X ?", "What are the symptoms of X ?", "What causes X ?", "Is X inherited ?",
                     "What research (or clinical trials) is being done for X ?",
                     "What research (or clinical trials) is being done for X ?", "Who is at risk for X? ?",
                     "How to diagnose X ?", "Do you have information about X", "other"]


def test_breakdown_by_source_and_question_type_with_counts():
    records = [{"instruction": "What causes Gout ?", "source": "GARD", "rougeL": 0.4, "judge_score": 80},
               {"instruction": "What causes Lupus ?", "source": "GHR", "rougeL": 0.2, "judge_score": None},
               {"instruction": "Is Gout inherited ?", "source": "GHR", "rougeL": 0.3, "judge_score": 60}]
    table = evaluate.breakdown(records, [{"rougeL": 0.1}, {"rougeL": 0.2}, {"rougeL": 0.0}])
    assert list(table.columns) == ["answers", "ROUGE-L before", "ROUGE-L after", "change", "judge", "judged"]
    assert table.loc[("source", "GHR")].tolist() == pytest.approx([2, 0.1, 0.25, 0.15, 60.0, 1])
    assert table.loc[("source", "GARD")].tolist() == pytest.approx([1, 0.1, 0.4, 0.3, 80.0, 1])
    assert table.loc[("question type", "What causes X ?")].tolist() == pytest.approx([2, 0.15, 0.3, 0.15, 80.0, 1])
    assert table.loc[("question type", "Is X inherited ?")].tolist() == pytest.approx([1, 0.0, 0.3, 0.3, 60.0, 1])
    assert list(table.index.get_level_values(1)) == ["GHR", "GARD", "What causes X ?", "Is X inherited ?"]


def test_breakdown_without_a_baseline_or_a_judge_shows_what_there_is():
    records = [{"instruction": "What causes Gout ?", "source": "GARD", "rougeL": 0.4, "judge_score": None}]
    table = evaluate.breakdown(records)
    assert list(table.columns) == ["answers", "ROUGE-L after"]
    assert table.loc[("source", "GARD"), "ROUGE-L after"] == pytest.approx(0.4)


# ---------------------------------------------------------------- text in any script

SCRIPTS = {"Chinese": "糖尿病是一种慢性疾病，会影响身体如何利用血糖。", "Hebrew": "סוכרת היא מחלה כרונית המשפיעה על הסוכר בדם",
           "Hindi": "मधुमेह एक पुरानी बीमारी है जो रक्त शर्करा को प्रभावित करती है", "emoji": "🩺 💊 😷 👍🏽 🎉",
           "Russian": "Диабет — хроническое заболевание, влияющее на уровень сахара в крови"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_identical_answers_in_any_script_score_full_marks(script):
    text = SCRIPTS[script]
    assert evaluate.rouge_scores([text], [text]) == [{"rouge1": 1.0, "rougeL": 1.0}]
    assert evaluate.corpus_bleu([text], [text]) == 100.0
    [other] = evaluate.rouge_scores([SCRIPTS["Russian" if script != "Russian" else "Hebrew"]], [text])
    assert other == {"rouge1": 0.0, "rougeL": 0.0}


def test_chinese_words_are_scored_by_character_and_english_as_rouge_score_does():
    from rouge_score import rouge_scorer

    [s] = evaluate.rouge_scores(["糖尿病影响血糖"], ["糖尿病是一种慢性疾病"])
    assert 0 < s["rouge1"] < 1
    assert evaluate.bleu_tokenizer([SCRIPTS["Chinese"]]) == "zh"
    assert evaluate.bleu_tokenizer(["Ménière's disease affects the inner ear."]) == "13a"
    default = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    for pred, ref in [("Ménière's disease: vertigo <10 µg 38°C, naïve", "Meniere disease is vertigo; µg ½ café"),
                      ("The signs and symptoms include running noses", "symptom includes runs nose, fevers")]:
        want = {k: round(v.fmeasure, 4) for k, v in default.score(ref, pred).items()}
        assert evaluate.rouge_scores([pred], [ref]) == [want]


def test_a_score_that_sees_little_of_the_text_says_so():
    refs = ["?!… —— ** ++ ==", "((( ))) ::"]
    with pytest.warns(UserWarning, match="see only 0%"):
        summary, _ = evaluate.text_scores(refs, refs)
    assert "see only 0%" in summary["note"]
    for text in (SCRIPTS["Chinese"], "GOUT IS A FORM OF ARTHRITIS, Mostly In The Big Toe."):
        summary, _ = evaluate.text_scores([text], [text])
        assert "note" not in summary and evaluate.text_seen([text]) > 0.85


# ---------------------------------------------------------------- the record before fine-tuning

def test_the_record_before_fine_tuning_is_never_written_from_trained_weights(tmp_path):
    from medqa import store
    from medqa.errors import MedQAError

    first = [{"instruction": "q", "model_response": "untrained", "rouge1": 0.1, "rougeL": 0.1}]
    summary = {"rougeL": {"mean": 0.1}, "loss": 10.83}
    assert evaluate.record_before(tmp_path, first, summary) == (summary, [{"rouge1": 0.1, "rougeL": 0.1}])
    assert store.read_json(tmp_path / "metrics.json", "")["evaluation"]["before"] == summary
    store.update_json(tmp_path / "metrics.json", history=[{"step": 1}])  # training has run
    said = []
    trained = [{"instruction": "q", "model_response": "trained", "rouge1": 0.9, "rougeL": 0.9}]
    kept = evaluate.record_before(tmp_path, trained, {"rougeL": {"mean": 0.9}, "loss": 7.747}, log=said.append)
    assert kept == (summary, [{"rouge1": 0.1, "rougeL": 0.1}])
    assert store.read_json(tmp_path / "base_responses.json", "") == first
    assert store.read_json(tmp_path / "metrics.json", "")["evaluation"]["before"] == summary
    assert "keep the record from before training" in said[0] and "new folder" in said[0]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "checkpoint.pt").write_bytes(b"")  # training started, and nothing was recorded before it
    with pytest.raises(MedQAError, match="no record from before training is kept"):
        evaluate.record_before(fresh, trained, {"loss": 7.747})
    assert not (fresh / "base_responses.json").exists()


def test_question_types_ignore_case_as_python_does():
    # re's IGNORECASE folds the dotless ı and the Kelvin sign K with i and k; a template still matches them
    assert evaluate.question_type("what ıs (are) gout ?") == "What is (are) X ?"
    assert evaluate.question_type("WHAT CAUSES gout ?") == "What causes X ?"
    assert evaluate.question_type("Why does gout hurt ?") == "other"
