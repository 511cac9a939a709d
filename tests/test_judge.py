"""The LLM judge (medqa/judge.py) against a stand-in Ollama on 127.0.0.1 that replies in Ollama's own shapes.

Nothing here waits on the clock: a server that never answers hangs on an Event (released at teardown) behind a
tiny client timeout, and the time budget runs on an injected clock.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medqa import judge, judge_files, ollama_api
from medqa.errors import MedQAError, StorageError

HANG = object()


def said(content):
    """A finished, non-streamed /api/chat reply as Ollama sends it."""
    return 200, {"model": "llama3", "created_at": "2026-11-25T15:00:00.000000Z",
                 "message": {"role": "assistant", "content": content}, "done_reason": "stop", "done": True,
                 "total_duration": 1000, "load_duration": 10, "prompt_eval_count": 90, "prompt_eval_duration": 100,
                 "eval_count": 7, "eval_duration": 100}


def judged_parts(body):
    """(reference, response) from the judge prompt of a request."""
    text = body["messages"][0]["content"]
    reference = re.search(r"correct output `(.*?)`, score the model response", text, re.S).group(1)
    response = re.search(r"score the model response `(.*?)` on a scale", text, re.S).group(1)
    return reference, response


def comparing_judge(body):
    """A judge that can judge: an answer marked REPLY:<text> gets <text>; otherwise (the sanity anchors) 95 when
    the response is the reference and 5 when it is not."""
    reference, response = judged_parts(body)
    if response.startswith("REPLY:"):
        return said(response[len("REPLY:"):])
    return said(json.dumps({"score": 95 if response == reference else 5}))


class StandIn:
    def __init__(self):
        self.models = {"llama3"}
        self.context_length = 8192
        self.capabilities = ["completion"]
        self.chat = comparing_judge   # body -> (status, JSON object or raw bytes), or HANG
        self.show_hangs = False
        self.chats = []               # the bodies of /api/chat requests, in order
        self.release = threading.Event()
        self.host = None


@pytest.fixture
def ollama():
    stand_in = StandIn()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/api/show":
                if stand_in.show_hangs:
                    stand_in.release.wait()
                    return
                if body["model"] not in stand_in.models:
                    return self._reply(404, {"error": f"model '{body['model']}' not found"})
                return self._reply(200, {"modelfile": "FROM llama3", "parameters": "", "template": "{{ .Prompt }}",
                                         "details": {"format": "gguf", "family": "llama"},
                                         "model_info": {"general.architecture": "llama",
                                                        "llama.context_length": stand_in.context_length},
                                         "capabilities": stand_in.capabilities,
                                         "modified_at": "2026-11-01T10:00:00.000000Z"})
            if self.path != "/api/chat":
                return self._reply(404, b"404 page not found")
            stand_in.chats.append(body)
            if body["model"] not in stand_in.models:
                return self._reply(404, {"error": f'model "{body["model"]}" not found, try pulling it first'})
            result = stand_in.chat(body)
            if result is HANG:
                stand_in.release.wait()
                return
            self._reply(*result)

        def _reply(self, code, payload):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    stand_in.host = f"http://127.0.0.1:{srv.server_address[1]}"
    yield stand_in
    stand_in.release.set()
    srv.shutdown()
    srv.server_close()


def answers(*replies):
    """Test answers whose judge reply is the text after REPLY: (see comparing_judge)."""
    return [{"instruction": f"What is disease {i}?", "input": "", "output": f"Disease {i} is reference {i}.",
             "model_response": f"REPLY:{r}"} for i, r in enumerate(replies)]


@pytest.fixture(autouse=True)
def hooks(monkeypatch):
    """No wait between tries and no progress bar; each test sets the clock or the anchors it needs."""
    hooks = judge.Hooks(retry_wait_s=0, show_bar=False)
    monkeypatch.setattr(judge, "HOOKS", hooks)
    return hooks


def run(stand_in, records, n_anchors=0, **kw):
    lines = []
    judge.HOOKS.n_anchors = n_anchors
    kw = {"log": lines.append, **kw}
    summary, scores = judge.judge(records, stand_in.host, kw.pop("model", "llama3"), **kw)
    return summary, scores, lines


def closed_port_host():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, and closed again: nothing listens there
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------- reading replies

@pytest.mark.parametrize("reply, expected", [
    ('{"score": 85}', (85, "json")),
    ('{"score": 0}', (0, "json")),
    ('{"score": 85.0}', (85, "json")),
    ('{"score": "90"}', (90, "text")),
    ("On a scale from 0 to 100, I would give it 75.", (75, "text")),
    ("Score (0-100): 80", (80, "text")),
    ("75/100", (75, "text")),
    ("I would rate it 40 out of 100.", (40, "text")),
    ("85", (85, "text")),
    (" 55\n", (55, "text")),
    ("100", (100, "text")),
    ("I'd rate it 8/10", (None, "score on another scale")),
    ("70 or 80", (None, "ambiguous reply")),
    ("80-90", (None, "ambiguous reply")),
    ("150", (None, "score out of range")),
    ("-5", (None, "score out of range")),
    ('{"score": 101}', (None, "score out of range")),
    ("7.5", (None, "score not a whole number")),
    ("a fine answer", (None, "no score in reply")),
    ("", (None, "empty reply")),
    (None, (None, "empty reply")),
])
def test_read_score(reply, expected):
    assert ollama_api.read_score(reply) == expected


def test_num_ctx_fits_the_longest_prompt_within_the_models_context():
    assert ollama_api.context_size(["x" * 300], 8192) == 2048
    assert ollama_api.context_size(["x" * 300, "x" * 30_000], 32768) == 16384  # 10,000 + 128 tokens
    assert ollama_api.context_size(["x" * 30_000], 8192) == 8192


# ---------------------------------------------------------------- asking the stand-in

def test_structured_replies_are_read_and_the_request_asks_for_them(ollama):
    summary, scores, lines = run(ollama, answers('{"score": 85}', '{"score": 40}'), seed=7)
    assert scores == [85, 40] and lines == []
    assert (summary.mean, summary.scored, summary.unscored, summary.read_from_text) == (62.5, 2, 0, 0)
    body = ollama.chats[-1]
    assert body["format"] == ollama_api.SCORE_SCHEMA and body["stream"] is False
    assert body["options"] == {"temperature": 0, "seed": 7, "num_ctx": 2048, "num_predict": ollama_api.REPLY_TOKENS}
    assert "think" not in body  # Ollama refuses `think` for models that cannot think


def test_a_thinking_model_is_asked_not_to_think(ollama):
    ollama.capabilities = ["completion", "thinking"]
    _, scores, _ = run(ollama, answers('{"score": 85}'))
    assert scores == [85] and ollama.chats[-1]["think"] is False


def test_free_text_replies_are_read_carefully_and_counted(ollama):
    summary, scores, _ = run(ollama, answers("On a scale from 0 to 100, I would give it 75.", "Score (0-100): 80",
                                             "75/100"))
    assert scores == [75, 80, 75] and summary.read_from_text == 3


def test_unreadable_replies_are_unscored_and_counted_by_reason(ollama):
    summary, scores, lines = run(ollama, answers("150", "a fine answer", "I'd rate it 8/10", "90"))
    assert scores == [None, None, None, 90] and lines == []
    assert summary.unscored_by_reason == {"score out of range": 1, "no score in reply": 1,
                                             "score on another scale": 1}
    assert (summary.scored, summary.unscored, summary.mean, summary.stopped) == (1, 3, 90, None)


def test_a_long_reference_gets_a_context_that_holds_it(ollama):
    ollama.context_length = 32768
    records = answers('{"score": 50}')
    records[0]["output"] = "word " * 6000  # 30,000 characters: cut by a default 2048- or 4096-token context
    summary, _, _ = run(ollama, records)
    assert ollama.chats[-1]["options"]["num_ctx"] == 16384
    assert (summary.num_ctx, summary.too_long_for_context) == (16384, 0)


def test_a_prompt_longer_than_the_models_context_is_counted(ollama):
    records = answers('{"score": 50}', '{"score": 60}')
    records[0]["output"] = "word " * 6000
    summary, scores, _ = run(ollama, records)
    assert ollama.chats[-1]["options"]["num_ctx"] == 8192  # the model's own context length, from /api/show
    assert summary.too_long_for_context == 1 and scores == [50, 60]


def test_empty_answers_score_zero_without_asking(ollama):
    records = answers('{"score": 70}', "", "")
    records[1]["model_response"], records[2]["model_response"] = "", "  \n"
    summary, scores, _ = run(ollama, records)
    assert scores == [70, 0, 0] and len(ollama.chats) == 1
    assert (summary.empty_answers, summary.mean) == (2, round(70 / 3, 2))


def test_sanity_anchors_judge_references_against_themselves_and_against_others(ollama):
    records = answers(*['{"score": 30}'] * 7)
    summary, scores, _ = run(ollama, records, n_anchors=5, seed=11)
    assert summary.sanity == {"self": 95, "other": 5, "n": 5} and scores == [30] * 7
    anchors = [judged_parts(b) for b in ollama.chats if not judged_parts(b)[1].startswith("REPLY:")]
    assert len(anchors) == 10 and sum(ref == resp for ref, resp in anchors) == 5
    first = [b["messages"] for b in ollama.chats]
    ollama.chats.clear()
    run(ollama, records, n_anchors=5, seed=11)
    assert [b["messages"] for b in ollama.chats] == first  # the same seed judges the same items


def test_the_progress_bar_is_text_on_stdout_as_trainings_is(ollama, capsys, monkeypatch):
    """A notebook stores what the judge prints: text, which GitHub shows, never a widget (tqdm.auto's pick)."""
    import tqdm.auto

    def widget(*args, **kwargs):
        raise AssertionError("the judge asked tqdm.auto for its bar: in a notebook that is a widget")

    monkeypatch.setattr(tqdm.auto, "tqdm", widget)
    judge.HOOKS.show_bar = True
    summary, _, _ = run(ollama, answers('{"score": 60}', '{"score": 80}'))
    out, err = capsys.readouterr()
    assert summary.scored == 2 and "judging with llama3" in out and "2/2" in out and "judging" not in err


def test_a_server_error_is_retried(ollama):
    calls = []

    def flaky(body):
        calls.append(1)
        return (500, {"error": "llama runner process has terminated: signal: killed"}) if len(calls) == 1 \
            else comparing_judge(body)

    ollama.chat = flaky
    summary, scores, lines = run(ollama, answers('{"score": 66}'))
    assert scores == [66] and len(ollama.chats) == 2 and lines == []


def test_server_errors_stop_the_judge_after_a_few_in_a_row(ollama):
    ollama.chat = lambda body: (500, {"error": "llama runner process has terminated: signal: killed"})
    summary, scores, lines = run(ollama, answers(*["80"] * 5))
    assert scores == [None] * 5
    assert len(ollama.chats) == judge.MAX_FAILURES_IN_ROW * judge.TRIES
    assert summary.unscored_by_reason == {"HTTP 500": 3, "not asked": 2}
    assert len(lines) == 1 and "3 requests in a row failed (last: HTTP 500)" in lines[0]
    assert judge_files.RERUN in lines[0] and summary.stopped


def test_replies_that_are_not_ollamas_are_counted_not_raised(ollama):
    bad = {0: (200, b"<html>proxy error</html>"), 1: (200, {"unexpected": True}), 3: (200, [1, 2])}

    def replies(body):
        n = len(ollama.chats) - 1
        return bad.get(n) or comparing_judge(body)

    ollama.chat = replies
    summary, scores, lines = run(ollama, answers("10", "20", "30", "40"))
    assert scores == [None, None, 30, None] and lines == []
    assert summary.unscored_by_reason == {"reply not JSON": 1, "unexpected reply shape": 2}
    assert len(ollama.chats) == 4  # not retried


def test_a_server_that_never_answers_costs_a_few_timeouts_then_stops(ollama):
    ollama.chat = lambda body: HANG
    summary, scores, lines = run(ollama, answers(*["80"] * 6), timeout_s=0.2)
    assert scores == [None] * 6 and len(ollama.chats) == judge.MAX_FAILURES_IN_ROW  # timeouts are not retried
    assert summary.unscored_by_reason == {"timeout": 3, "not asked": 3}
    assert len(lines) == 1 and "(last: timeout)" in lines[0] and judge_files.RERUN in lines[0]


def test_a_host_that_never_answers_is_found_before_judging(ollama):
    ollama.show_hangs = True
    summary, scores, lines = run(ollama, answers("80"), timeout_s=0.2)
    assert scores == [None] and ollama.chats == []
    assert len(lines) == 1 and "did not answer within 0.2 s" in lines[0] and judge_files.RERUN in lines[0]
    assert summary.sanity is None and summary.mean is None


def test_the_budget_stops_the_judge(ollama, hooks):
    now = [0.0]

    def costly(body):
        now[0] += 40.0  # each request takes 40 s on the injected clock
        return comparing_judge(body)

    ollama.chat = costly
    hooks.clock = lambda: now[0]
    summary, scores, lines = run(ollama, answers(*['{"score": 50}'] * 5), budget_s=100)
    assert scores == [50, 50, 50, None, None]
    assert summary.unscored_by_reason == {"not asked": 2}
    assert len(lines) == 1 and "time budget of 100 s" in lines[0] and judge_files.RERUN in lines[0]


def test_a_model_that_is_not_pulled_says_how_to_pull_it(ollama):
    summary, scores, lines = run(ollama, answers("80"), model="mistral")
    assert scores == [None] and ollama.chats == []
    assert lines == [f"LLM judge skipped: Ollama at {ollama.host} has no model 'mistral': run `ollama pull "
                     f"mistral` (or check that OLLAMA_HOST points at Ollama). Judge later with `{judge_files.RERUN}`."]
    assert summary.sanity is None and summary.unscored_by_reason == {"not asked": 1}


def test_no_server_at_all_is_one_clear_line():
    lines = []
    summary, scores = judge.judge(answers("80"), closed_port_host(), "llama3", timeout_s=5, log=lines.append)
    assert scores == [None] and summary.sanity is None
    assert len(lines) == 1 and "not reachable" in lines[0] and "ollama serve" in lines[0]


# ---------------------------------------------------------------- the answers file and the command

@pytest.fixture
def run_dir(tmp_path):
    records = answers('{"score": 60}', '{"score": 80}', '{"score": 70}')
    (tmp_path / "test_responses.json").write_text(json.dumps(records), encoding="utf-8")
    metrics = {"settings": {"JUDGE_MODEL": "llama3", "SEED": 5},
               "evaluation": {"after": {"bleu": 3.0}, "before": {"bleu": 1.0}}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return tmp_path


def test_the_command_writes_scores_back_and_keeps_the_rest_of_metrics(ollama, run_dir, capsys):
    assert judge.main([str(run_dir / "test_responses.json"), "--host", ollama.host]) == 0
    records = json.loads((run_dir / "test_responses.json").read_text())
    assert [r["judge_score"] for r in records] == [60, 80, 70]
    assert records[0]["model_response"] == 'REPLY:{"score": 60}'
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["evaluation"]["after"] == {"bleu": 3.0} and metrics["evaluation"]["before"] == {"bleu": 1.0}
    result = metrics["evaluation"]["judge"]["test_responses.json"]  # one result per answers file
    assert result["mean"] == 70 and result["sanity"]["n"] == 3 and result["answers"] == "test_responses.json"
    assert metrics["settings"] == {"JUDGE_MODEL": "llama3", "SEED": 5}
    assert ollama.chats[-1]["options"]["seed"] == 5  # the run's seed, from metrics.json
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.json", "test_responses.json"]
    assert "mean 70" in capsys.readouterr().out


def test_the_notebook_without_ollama_records_a_null_judge(run_dir):
    summary, scores = judge.judge_file(run_dir / "test_responses.json", closed_port_host(), "llama3",
                                       log=lambda line: None)
    assert scores == [None] * 3 and summary.sanity is None and summary.mean is None
    records = json.loads((run_dir / "test_responses.json").read_text())
    assert [r["judge_score"] for r in records] == [None] * 3
    evaluation = json.loads((run_dir / "metrics.json").read_text())["evaluation"]
    assert evaluation["judge"]["test_responses.json"]["sanity"] is None and evaluation["after"] == {"bleu": 3.0}


def test_a_judge_that_scores_nothing_keeps_earlier_scores(run_dir):
    records = json.loads((run_dir / "test_responses.json").read_text())
    for r in records:
        r["judge_score"] = 50
    (run_dir / "test_responses.json").write_text(json.dumps(records), encoding="utf-8")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    assert judge.main([str(run_dir / "test_responses.json"), "--host", closed_port_host()]) == 1
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.parametrize("content, says", [
    (None, "does not exist"),
    ("FOLDER", "is a folder: pass the answers file in it"),
    ("{not json", "is not valid JSON"),
    ('{"instruction": "Q"}', "is not a list of answers"),
    ("[]", "is not a list of answers"),
    ('[{"instruction": "Q", "output": "A"}]', "answer 0 lacks text field(s) ['model_response']"),
    ('[{"instruction": "Q", "output": "A", "model_response": null}]', "lacks text field(s) ['model_response']"),
])
def test_the_command_refuses_bad_files_with_one_line(tmp_path, capsys, content, says):
    path = tmp_path / "test_responses.json"
    if content == "FOLDER":
        path = tmp_path
        (tmp_path / "test_responses.json").write_text("[]", encoding="utf-8")
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert judge.main([str(path), "--host", closed_port_host()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_a_damaged_metrics_file_is_refused_before_judging(ollama, run_dir, capsys):
    (run_dir / "metrics.json").write_text('{"evaluation": ', encoding="utf-8")
    lines = []  # the notebook's call says so in one line and returns: the finished run goes on
    summary, scores = judge.judge_file(run_dir / "test_responses.json", ollama.host, "llama3",
                                       log=lines.append)
    assert len(lines) == 1 and "metrics.json is damaged" in lines[0] and summary.mean is None
    assert ollama.chats == []
    assert judge.main([str(run_dir / "test_responses.json"), "--host", ollama.host]) == 2
    assert "metrics.json is damaged" in capsys.readouterr().err and ollama.chats == []


def test_the_module_runs_as_a_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "medqa.judge", str(tmp_path / "missing.json")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "does not exist" in done.stderr


def test_the_command_has_help(capsys):
    with pytest.raises(SystemExit) as done:
        judge.main(["--help"])
    shown = capsys.readouterr().out
    assert done.value.code == 0 and "--budget-s" in shown and "test_responses.json" in shown


# ---------------------------------------------------------------- the judge's address

@pytest.mark.parametrize("value, url", [
    ("http://127.0.0.1:11434", "http://127.0.0.1:11434"), ("localhost:11434", "http://localhost:11434"),
    ("0.0.0.0:11434", "http://0.0.0.0:11434"), ("gpu-box", "http://gpu-box:11434"),  # Ollama's port, as it reads it
    ("https://ollama.example.org/", "https://ollama.example.org"), ("[::1]:8080", "http://[::1]:8080"),
    ("HTTP://Box:1/ollama", "http://Box:1/ollama")])
def test_an_ollama_address_is_written_out_as_ollama_reads_it(value, url):
    assert ollama_api.check_ollama_host(value) == url


@pytest.mark.parametrize("value, words", [
    ("http://127.0.0.1:abc", "port that is not a number"), ("localhost:abc", "port that is not a number"),
    ("http://127.0.0.1:99999", "port that is not a number"), ("http://127.0.0.1:0", "port 0"),
    ("ftp://127.0.0.1:11434", "scheme 'ftp://'"), ("http://:11434", "names no host"), (":11434", "names no host"),
    ("http:/localhost:11434", "two slashes"), ("local host:11434", "space"), ("localhost:11434\n", "blank"),
    ("", "is empty"), ("http://[::1:11434", "bracket"), ("http://user@box:11434", "more than a host"),
    ("http://box:11434/?x=1", "more than a host"), ("http://localhost:11434/api", "API path '/api'"),
    ("localhost:11434/api/generate", "API path '/api/generate'"), ("http://box/ollama/api/chat/", "API path")])
def test_a_bad_ollama_address_is_refused_naming_the_setting_and_the_fix(value, words):
    with pytest.raises(MedQAError, match=re.escape(words)) as refused:
        ollama_api.check_ollama_host(value)
    assert str(refused.value).startswith(f"OLLAMA_HOST={value!r}") and "http://localhost:11434" in str(refused.value)


def test_a_bad_ollama_address_is_refused_when_settings_are_resolved():
    from medqa import settings

    for params, env in (({"OLLAMA_HOST": "http://127.0.0.1:abc"}, {}), ({}, {"OLLAMA_HOST": "127.0.0.1:abc"})):
        with pytest.raises(MedQAError, match="OLLAMA_HOST=.*port that is not a number"):
            settings.resolve({"PROFILE": "smoke", **params}, env=env)
    assert settings.resolve({"PROFILE": "smoke"}, env={"OLLAMA_HOST": "gpu-box"}).OLLAMA_HOST == "http://gpu-box:11434"


NOTEBOOK_JUDGE = """
import sys
from medqa import judge
summary, scores = judge.judge_file(sys.argv[1], sys.argv[2], "llama3")
print("returned", summary.mean, scores)
"""


def test_a_bad_address_in_the_environment_never_fails_the_finished_run(run_dir, ollama):
    """Importing ollama builds a client from $OLLAMA_HOST: a bad value raised a bare ValueError there, in the
    notebook's judge cell and in the command, even with a good --host."""
    env = {**os.environ, "OLLAMA_HOST": "http://127.0.0.1:abc"}
    answers = str(run_dir / "test_responses.json")
    done = subprocess.run([sys.executable, "-c", NOTEBOOK_JUDGE, answers, ollama.host], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "returned None [None, None, None]" in done.stdout and "OLLAMA_HOST" in done.stdout
    done = subprocess.run([sys.executable, "-m", "medqa.judge", answers], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "port that is not a number" in done.stderr
    assert ollama.chats == []


def test_nothing_the_judge_meets_escapes_from_the_notebooks_call(run_dir, ollama, monkeypatch):
    def full_disk(path, obj):
        raise StorageError(f"Could not write {path}: no space left on device (OSError).")

    monkeypatch.setattr(judge, "write_json_atomic", full_disk)
    lines = []
    summary, scores = judge.judge_file(run_dir / "test_responses.json", ollama.host, "llama3",
                                       log=lines.append)
    assert summary.mean is None and "no space left" in summary.stopped and scores == []
    assert [line for line in lines if line.startswith("LLM judge skipped")][0].count("\n") == 0
    monkeypatch.undo()
    for host in ("http://127.0.0.1:abc", "", "ftp://x"):
        lines.clear()
        summary, scores = judge.judge_file(run_dir / "test_responses.json", host, "llama3",
                                           log=lines.append)
        assert scores == [None] * 3 and len(lines) == 1 and "LLM judge skipped" in lines[0]


# ---------------------------------------------------------------- one result per answers file, kept progress

def test_judging_the_base_answers_keeps_the_test_answers_result(ollama, run_dir):
    base = answers('{"score": 10}', '{"score": 20}', '{"score": 30}')
    (run_dir / "base_responses.json").write_text(json.dumps(base), encoding="utf-8")
    assert judge.main([str(run_dir / "test_responses.json"), "--host", ollama.host]) == 0
    assert judge.main([str(run_dir / "base_responses.json"), "--host", ollama.host]) == 0
    results = json.loads((run_dir / "metrics.json").read_text())["evaluation"]["judge"]
    assert results["test_responses.json"]["mean"] == 70 and results["base_responses.json"]["mean"] == 20
    assert [results[name]["answers"] for name in sorted(results)] == ["base_responses.json", "test_responses.json"]


def test_a_result_not_keyed_by_an_answers_file_is_kept(ollama, run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["evaluation"]["judge"] = {"model": "llama3", "mean": 42.0, "scored": 3}
    (run_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    assert judge.main([str(run_dir / "test_responses.json"), "--host", ollama.host]) == 0
    results = json.loads((run_dir / "metrics.json").read_text())["evaluation"]["judge"]
    assert results[judge_files.UNRECORDED]["mean"] == 42.0 and results["test_responses.json"]["mean"] == 70


def interrupted_at(monkeypatch, n):
    """Ctrl-C while the n-th request is under way."""
    real, calls = ollama_api.ask, []

    def ask(*args):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ollama_api, "ask", ask)


def test_ctrl_c_stops_with_one_line_and_a_rerun_asks_only_for_the_rest(ollama, run_dir, monkeypatch, capsys):
    path = run_dir / "test_responses.json"
    interrupted_at(monkeypatch, 5)  # 6 anchor requests (3 items x 2), then 3 answers
    assert judge.main([str(path), "--host", ollama.host]) == 130
    out, err = capsys.readouterr()
    said = [line for line in out.split("\n") if line and not line.startswith("\rjudging with")]  # the bar aside
    assert len(said) == 1 and "interrupted (Ctrl-C)" in said[0] and "Traceback" not in err
    assert len(ollama.chats) == 4
    kept = json.loads(judge_files.progress_path(path).read_text())["replies"]
    assert len(kept) == 4
    monkeypatch.undo()
    ollama.chats.clear()
    assert judge.main([str(path), "--host", ollama.host]) == 0
    assert len(ollama.chats) == 5  # only what was missing
    assert [r["judge_score"] for r in json.loads(path.read_text())] == [60, 80, 70]
    result = json.loads((run_dir / "metrics.json").read_text())["evaluation"]["judge"]["test_responses.json"]
    assert result["reused"] == 4 and result["sanity"] == {"self": 95, "other": 5, "n": 3}
    assert not judge_files.progress_path(path).exists()  # every reply is in the files now
    assert "4 replies kept" in capsys.readouterr().out


def test_a_killed_judge_loses_no_reply(ollama, run_dir):
    """kill -9 in the middle of a request: the replies before it are on disk, and only the rest is asked again."""
    path = run_dir / "test_responses.json"
    started = threading.Event()

    def hangs_at_seventh(body):
        if len(ollama.chats) == 7:
            started.set()
            return HANG
        return comparing_judge(body)

    ollama.chat = hangs_at_seventh
    command = subprocess.Popen([sys.executable, "-m", "medqa.judge", str(path), "--host", ollama.host],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert started.wait(120)
    finally:
        command.kill()
        command.wait()
    assert len(json.loads(judge_files.progress_path(path).read_text())["replies"]) == 6
    ollama.chat, ollama.chats[:] = comparing_judge, []
    assert judge.main([str(path), "--host", ollama.host]) == 0
    assert len(ollama.chats) == 3 and [r["judge_score"] for r in json.loads(path.read_text())] == [60, 80, 70]


def test_kept_replies_are_reused_only_for_the_same_question_to_the_same_judge(ollama, run_dir, monkeypatch):
    path = run_dir / "test_responses.json"
    interrupted_at(monkeypatch, 9)
    judge.judge_file(path, ollama.host, "llama3", log=lambda line: None)
    monkeypatch.undo()
    records = json.loads(path.read_text())
    records[2]["model_response"] = 'REPLY:{"score": 15}'  # another answer: its kept reply (none here) cannot count
    records[0]["model_response"] = 'REPLY:{"score": 25}'  # another answer: its kept reply must not count
    path.write_text(json.dumps(records), encoding="utf-8")
    ollama.chats.clear()
    summary, scores = judge.judge_file(path, ollama.host, "llama3", log=lambda line: None)
    assert scores == [25, 80, 15] and len(ollama.chats) == 2
    ollama.models.add("mistral")
    ollama.chats.clear()
    (run_dir / "test_responses.judge-progress.json").write_text('{"replies": {"x": ["many", 1]}}')
    lines = []
    judge.judge_file(path, ollama.host, "mistral", log=lines.append)
    assert len(ollama.chats) == 9 and "damaged" in lines[0]  # another judge asks everything again


def test_the_judges_defaults_are_the_settings_defaults():
    """judge.py does not import medqa.settings (settings imports judge): the two must still agree."""
    from medqa.settings import COMMON

    assert (judge.DEFAULT_MODEL, judge.DEFAULT_HOST, judge.DEFAULT_BUDGET_S, judge.DEFAULT_SEED) == \
        (COMMON["JUDGE_MODEL"], COMMON["OLLAMA_HOST"], COMMON["JUDGE_BUDGET_S"], COMMON["SEED"])
    imports = [line for module in (judge, judge_files, ollama_api) for line in open(module.__file__, encoding="utf-8")
               if line.startswith(("import ", "from "))]
    assert not [line for line in imports if "settings" in line]


def test_a_result_another_process_records_meanwhile_is_kept(ollama, run_dir, monkeypatch):
    """The merge into evaluation.judge reads metrics.json under the folder lock: what another judge (or the
    notebook) records just after this judge read metrics.json is kept."""
    from medqa import store

    reads, others = judge_files.read_json, []

    def read_then_another_process_records(path, fix):
        content = reads(path, fix)
        if path.name == "metrics.json":  # another judge records its result right after each read
            others.append(f"other_{len(others)}.json")
            evaluation = store.read_json(path, fix)["evaluation"]
            judged = {**evaluation.get("judge", {}), others[-1]: {"model": "llama3", "mean": 20}}
            store.update_json(path, evaluation={**evaluation, "judge": judged})
        return content

    monkeypatch.setattr(judge_files, "read_json", read_then_another_process_records)
    assert judge.main([str(run_dir / "test_responses.json"), "--host", ollama.host]) == 0
    evaluation = json.loads((run_dir / "metrics.json").read_text())["evaluation"]
    assert evaluation["after"] == {"bleu": 3.0} and others
    assert sorted(evaluation["judge"]) == sorted(others + ["test_responses.json"])


def test_progress_in_memory_finishes_and_answers_load_from_a_string_path(tmp_path):
    judge_files.Progress().finish()  # kept in memory only: nothing to remove
    path = tmp_path / "test_responses.json"
    path.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a", "model_response": "b"}]))
    assert judge_files.load_answers(str(path))[0]["model_response"] == "b"
