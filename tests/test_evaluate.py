"""Scoring helpers on hand-made pairs, and the Ollama judge against a small HTTP server on 127.0.0.1."""

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from medqa import batches, evaluate
from medqa.batches import IGNORE


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


def test_reference_perplexity_counts_answer_tokens_only(tiny_model):
    prompt, answer = [10, 11, 12, 13], [20, 21, 22]
    loader = batches.make_loader(batches.QADataset(_frame([(prompt, answer)]), 64), 1, 64, shuffle=False,
                                 mask_prompt=True)
    got = evaluate.reference_perplexity(tiny_model, loader, torch.device("cpu"))
    ids = torch.tensor([prompt + answer + [50256]])
    labels = ids.clone()
    labels[0, : len(prompt)] = IGNORE  # Hugging Face shifts labels itself
    tiny_model.eval()
    with torch.no_grad():
        expected = tiny_model(input_ids=ids, labels=labels).loss.item()
    assert got["loss"] == pytest.approx(expected, abs=1e-4)
    assert got["perplexity"] == pytest.approx(2.718281828 ** got["loss"], rel=1e-3)


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


# ---------------------------------------------------------------- the judge

@pytest.fixture(scope="module")
def ollama():
    """An Ollama look-alike: the reply is whatever follows REPLY: in the judged response."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if self.path != "/api/chat":
                return self.send_error(404)
            if body["model"] != "llama3":
                return self._json(404, {"error": f"model '{body['model']}' not found"})
            reply = re.search(r"REPLY:([^`]*)", body["messages"][0]["content"]).group(1)
            if reply == "SLOW":
                time.sleep(1.0)
            self._json(200, {"model": "llama3", "message": {"role": "assistant", "content": reply}, "done": True})

        def _json(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    srv.shutdown()


def examples(*replies):
    return [{"instruction": f"Q{i}", "output": "reference", "model_response": f"REPLY:{r}"} for i, r in enumerate(replies)]


def test_integer_replies_and_replies_with_words(ollama):
    host, seen = ollama
    summary, scores = evaluate.judge(examples("85", "Score: 72", "I would rate it 40 out of 100."), host, "llama3",
                                     timeout=5, retries=0)
    assert scores == [85, 72, 40]
    assert summary == {"model": "llama3", "mean": 65.67, "scored": 3, "unscored": 0}
    assert seen[-1]["options"] == {"temperature": 0, "seed": 123} and seen[-1]["stream"] is False


def test_out_of_range_and_non_numeric_replies_are_counted_as_unscored(ollama):
    host, _ = ollama
    summary, scores = evaluate.judge(examples("150", "a fine answer", "-5", "90"), host, "llama3", timeout=5, retries=0)
    assert scores == [None, None, None, 90]
    assert (summary["scored"], summary["unscored"], summary["mean"]) == (1, 3, 90)


def test_a_reply_slower_than_the_timeout_is_retried_then_unscored(ollama):
    host, seen = ollama
    before = len(seen)
    summary, scores = evaluate.judge(examples("SLOW", "70"), host, "llama3", timeout=0.3, retries=1)
    assert scores == [None, 70] and summary["unscored"] == 1
    assert len(seen) - before == 3  # two tries for the slow one, one for the other


def test_a_model_that_is_not_pulled_says_how_to_pull_it(ollama):
    host, _ = ollama
    lines = []
    assert evaluate.judge(examples("80"), host, "mistral", timeout=5, log=lines.append) == (None, None)
    assert lines == [f"LLM judge skipped: Ollama at {host} has no model 'mistral': run `ollama pull mistral`."]


def test_no_server_at_all_is_one_clear_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and closed again: nothing listens there
    lines = []
    assert evaluate.judge(examples("80"), f"http://127.0.0.1:{port}", "llama3", timeout=2, log=lines.append) == (None, None)
    assert len(lines) == 1 and "not reachable" in lines[0] and "ollama serve" in lines[0]


def test_parse_score():
    assert [evaluate.parse_score(t) for t in ("100", "0", " 55\n", "7.5", "101", "", None)] == \
        [100, 0, 55, None, None, None, None]
