"""An LLM served by Ollama scores each answer 0-100 against the reference (optional, after the run is saved).

The notebook and the command line share one code path:

    python -m medqa.judge OUTPUT_DIR/test_responses.json [--model llama3] [--host URL] [--budget-s 3600]

Nothing here raises into a finished run: `judge_file`, the notebook's call, turns whatever it meets (no
Ollama, a bad host, unreadable replies, a damaged file, a full disk) into one line and a summary that says so
(scores it could not get are None, counted by reason). Replies are kept as they come in a progress file beside
the answers (test_responses.judge-progress.json), so that a judge killed or stopped with Ctrl-C asks, when run
again, only for what is missing; the file goes once every request has its reply. metrics.json keeps one result
per answers file under evaluation.judge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import statistics
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from medqa.errors import MedQAError, retry
from medqa.store import read_json, update_json, write_json_atomic

JUDGE_PROMPT = (
    "Given the input `{question}` and correct output `{reference}`, score the model response "
    "`{response}` on a scale from 0 to 100, where 100 is the best score. "
    'Respond with JSON only, in the form {{"score": <integer from 0 to 100>}}.'
)
# Ollama constrains the reply to this schema (structured outputs); read_score still parses free text, for
# servers or models that ignore it.
SCORE_SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
                "required": ["score"]}
FIELDS = ("instruction", "output", "model_response")
# The project's defaults (settings.COMMON holds the same values for the notebook).
DEFAULT_MODEL, DEFAULT_HOST, DEFAULT_BUDGET_S, DEFAULT_SEED = "llama3", "http://localhost:11434", 3600.0, 123
OLLAMA_PORT = 11434          # the port Ollama listens on when an address names none
N_ANCHORS = 5                # test items judged twice more (reference against itself / another reference)
MAX_FAILURES_IN_ROW = 3      # requests that failed one after another before the judge stops asking
TRIES = 3                    # per request, for server errors and dropped connections only
CHECK_TIMEOUT_S = 10.0       # /api/show answers at once, so a host that never answers is found in seconds
REPLY_TOKENS = 128           # room for the chat template and the reply (num_predict caps the reply)
DEFAULT_CONTEXT = 8192       # when the server does not say the model's context length (llama3's)
RERUN = "python -m medqa.judge OUTPUT_DIR/test_responses.json"
INTERRUPTED = "interrupted (Ctrl-C)"
UNRECORDED = "answers file not recorded"  # the key of a result under evaluation.judge that names no file


def check_ollama_host(value, name: str = "OLLAMA_HOST") -> str:
    """Where Ollama runs, as the URL the judge connects to; a MedQAError names `name`, the problem and the
    fix.

    A bare host or host:port gets http:// (and port 11434 when it names none), as Ollama itself reads it; a
    URL keeps its scheme, port and path. Refused: an empty value, blanks, a scheme other than http(s), no
    host, a port that is not a number from 1 to 65535, a user name, query or fragment, a path ending in the
    API's own (/api, /api/generate)."""
    def bad(problem: str) -> MedQAError:
        return MedQAError(f"{name}={value!r} {problem}: set it to where Ollama runs, e.g. {DEFAULT_HOST!r}"
                          + (" (or None for the default)." if name == "OLLAMA_HOST" else "."))

    if not isinstance(value, str):
        raise bad("is not text")
    if not value.strip():
        raise bad("is empty")
    if any(c.isspace() for c in value):
        raise bad("holds a space or another blank")
    scheme, sep, rest = value.partition("://")
    if not sep:
        if re.match(r"^https?:/", value, re.I):
            raise bad("lacks the two slashes after its scheme")
        scheme, rest = "http", value
    if scheme.lower() not in ("http", "https"):
        raise bad(f"uses the scheme {scheme + '://'!r}, and Ollama speaks http:// or https://")
    try:
        parts = urllib.parse.urlsplit(f"{scheme.lower()}://{rest}")
    except ValueError:  # "Invalid IPv6 URL"
        raise bad("opens a bracket that does not close") from None
    try:
        port = parts.port
    except ValueError:  # "Port could not be cast to integer value", "Port out of range 0-65535"
        raise bad("has a port that is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise bad("names no host")
    if port == 0:
        raise bad("has port 0, which no server listens on")
    if parts.username is not None or parts.query or parts.fragment or "?" in rest or "#" in rest:
        raise bad("holds more than a host, a port and a path")
    # The client adds /api/<endpoint> itself: "http://localhost:11434/api/generate", copied from Ollama's
    # docs, would ask /api/api/generate/api/show, whose 404 reads as a model that is not pulled.
    if re.search(r"(^|/)api(/[^/]*)?$", parts.path.rstrip("/"), re.I):
        raise bad(f"ends in Ollama's API path {parts.path!r}, which the judge adds itself; give only the "
                  "server's address")
    netloc = parts.netloc + (f":{OLLAMA_PORT}" if not sep and port is None else "")
    return f"{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


class JudgeUnavailable(Exception):
    """Ollama cannot judge at all (not reachable, model not pulled); the message says how to fix it."""


class Unscored(Exception):
    """One request gave no score; the message is the reason it is counted under."""


class Transient(Unscored):
    """A failure worth another try (a server error, a dropped connection)."""


# ---------------------------------------------------------------- reading a reply

# "0-100", "(0 - 100)", "from 0 to 100", "between 0 and 100": the scale, not the score.
_SCALE = re.compile(r"\(?\s*(?:from\s+|between\s+)?\b0\s*(?:-|–|to|and)\s*100\b\s*\)?", re.I)
_FRACTION = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)\s*(?:/|out of)\s*(\d+)(?![\w.]?\d)", re.I)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\w)")


def read_score(content) -> tuple[int | None, str]:
    """The judge's score and how it was read ("json" or "text"), or None and why not.

    JSON `{"score": n}` first (what structured output returns); otherwise free text, carefully: the scale
    ("0-100", "from 0 to 100") is not a score, "75/100" and "75 out of 100" are, a lone number is. A score on
    another scale ("8/10") is refused rather than rescaled (the judge was asked for 0-100, and a rescaled
    guess would sit between real scores unseen), and so is a reply with two different candidate scores.
    """
    text = (content or "").strip()
    if not text:
        return None, "empty reply"
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "score" in obj:
        value = obj["score"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _in_range(value, "json")
        text = str(value)
    return _from_text(text)


def _from_text(text: str) -> tuple[int | None, str]:
    text = _SCALE.sub(" ", text)
    fractions = _FRACTION.findall(text)
    if any(float(denominator) != 100 for _, denominator in fractions):
        return None, "score on another scale"
    candidates = {float(n) for n, _ in fractions} or {float(n) for n in _NUMBER.findall(text)}
    if not candidates:
        return None, "no score in reply"
    if len(candidates) > 1:
        return None, "ambiguous reply"
    return _in_range(candidates.pop(), "text")


def _in_range(value: float, how: str) -> tuple[int | None, str]:
    if not float(value).is_integer():
        return None, "score not a whole number"
    if not 0 <= value <= 100:
        return None, "score out of range"
    return int(value), how


# ---------------------------------------------------------------- asking Ollama

def judge_prompt(record: dict, response: str) -> str:
    """The judge's question about `response` to `record`'s question, against its reference answer."""
    question = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return JUDGE_PROMPT.format(question=question, reference=record["output"], response=response)


def tokens_needed(prompt: str) -> int:
    """The context a request needs: about 3 characters a token (on the safe side for English), plus the
    reply."""
    return len(prompt) // 3 + REPLY_TOKENS


def context_size(prompts: list[str], limit: int) -> int:
    """num_ctx for the whole run: what the longest prompt needs, as a power of two from 2048, at most `limit`.
    One size for all requests, because Ollama reloads the model whenever num_ctx changes; without it the
    server's default context (2048 or 4096) cuts long references silently."""
    needed = max((tokens_needed(p) for p in prompts), default=REPLY_TOKENS)
    return min(max(2048, 1 << (needed - 1).bit_length()), limit)


def _ollama():
    """The ollama package. Importing it builds a default client from $OLLAMA_HOST, which raises a bare
    ValueError on a bad value, even when the judge is given a good host: check the variable first, to say what
    to fix."""
    if os.environ.get("OLLAMA_HOST"):
        check_ollama_host(os.environ["OLLAMA_HOST"], "OLLAMA_HOST (an environment variable)")
    import ollama

    return ollama


def _client(host: str, timeout_s: float):
    return _ollama().Client(host=host, timeout=timeout_s)


def failure(err: Exception) -> str:
    """What went wrong in a call of the ollama client, in a word or two: the one reading of its errors, which
    the check before judging and each request then word for their moment."""
    import httpx
    import ollama
    import pydantic

    if isinstance(err, ConnectionError):
        return "connection refused"
    if isinstance(err, ollama.ResponseError):
        return "no model" if err.status_code == 404 else f"HTTP {err.status_code}"
    if isinstance(err, httpx.TimeoutException):
        return "timeout"
    if isinstance(err, httpx.TransportError):
        return f"connection failed ({type(err).__name__})"
    if isinstance(err, json.JSONDecodeError):
        return "reply not JSON"
    if isinstance(err, (pydantic.ValidationError, TypeError)):
        return "unexpected reply shape"
    return f"unexpected error ({type(err).__name__})"


def _check_model(host: str, model: str, timeout_s: float) -> tuple[int, bool]:
    """Fail fast, before the progress bar: is Ollama there, does it have the model? Returns the model's
    context length and whether it thinks before answering."""
    try:
        _ollama()
    except MedQAError as err:
        raise JudgeUnavailable(str(err).rstrip(".")) from None
    try:
        with _client(host, timeout_s) as client:
            shown = client.show(model)
    except Exception as err:  # noqa: BLE001 -- whatever the host does, the run must go on
        said = {"connection refused": f"Ollama is not reachable at {host}: start it with `ollama serve` (and "
                                      f"`ollama pull {model}`), or set OLLAMA_HOST to where it runs",
                "no model": f"Ollama at {host} has no model {model!r}: run `ollama pull {model}` (or check "
                            f"that OLLAMA_HOST points at Ollama)",
                "timeout": f"{host} accepted the connection but did not answer within {timeout_s:g} s: is "
                           f"Ollama running there, and not stuck?"}.get(failure(err))
        if said is None and failure(err).startswith("HTTP"):
            said = f"Ollama at {host} answered {failure(err)} ({err.error}) when asked about model {model!r}"
        raise JudgeUnavailable(said or f"{host} did not answer like Ollama ({type(err).__name__}: {err})") \
            from None
    lengths = [v for k, v in (shown.modelinfo or {}).items()
               if k.endswith(".context_length") and isinstance(v, int)]
    return (lengths[0] if lengths else DEFAULT_CONTEXT), "thinking" in (shown.capabilities or [])


def _ask(client, host: str, model: str, prompt: str, options: dict, think) -> tuple[int | None, str]:
    """One chat request; a score (or None) and how it was read. A failure raises JudgeUnavailable where no
    further request can succeed, Transient where another try may, and Unscored otherwise."""
    try:
        reply = client.chat(model, messages=[{"role": "user", "content": prompt}], format=SCORE_SCHEMA,
                            options=options, think=think)
    except Exception as err:  # noqa: BLE001 -- the judge is optional: count it, never raise into the run
        reason = failure(err)
        if reason == "connection refused":
            raise JudgeUnavailable(f"Ollama stopped answering at {host} (connection refused): start it again "
                                   f"with `ollama serve`") from None
        if reason == "no model":
            raise JudgeUnavailable(f"Ollama at {host} no longer has model {model!r}: run "
                                   f"`ollama pull {model}`") from None
        # A timeout is not tried again: a server that hangs once mostly hangs again.
        worth_a_retry = reason in ("HTTP 429", *(f"HTTP {n}" for n in range(500, 600))) \
            or reason.startswith("connection failed")
        raise (Transient if worth_a_retry else Unscored)(reason) from None
    return read_score(reply.message.content)


# ---------------------------------------------------------------- judging a list of answers

@dataclass
class Hooks:
    """What tests set instead of the clock, the wait between tries, the progress bar and the sanity items."""

    clock: Callable[[], float] = time.monotonic
    retry_wait_s: float = 1.0
    show_bar: bool = True
    n_anchors: int = N_ANCHORS


HOOKS = Hooks()


@dataclass
class Summary:
    """What a judging found: metrics.json records it (`asdict`) under evaluation.judge[answers]."""

    answers: str | None = None     # the answers file's name
    model: str = DEFAULT_MODEL
    mean: float | None = None
    median: float | None = None
    n: int = 0                     # answers
    scored: int = 0
    unscored: int | None = None
    unscored_by_reason: dict = field(default_factory=dict)
    empty_answers: int = 0         # scored 0 without asking
    read_from_text: int = 0        # scores read from a reply that was not the JSON asked for
    num_ctx: int | None = None
    too_long_for_context: int = 0
    sanity: dict | None = None     # {"self", "other", "n"}: the anchors' means; None: not judged
    stopped: str | None = None     # why the judge stopped early
    reused: int = 0                # replies taken from the progress file
    requests_left: int | None = None
    seconds: float | None = None


@dataclass
class Budget:
    """The judge's time: requests stop once `seconds` have passed since it began."""

    seconds: float
    start: float = field(default_factory=lambda: HOOKS.clock())

    def elapsed(self) -> float:
        """Seconds since the judging began."""
        return HOOKS.clock() - self.start

    def spent(self) -> bool:
        """Whether the budget is used up, checked before each request."""
        return self.elapsed() >= self.seconds


def progress_path(path: Path) -> Path:
    """Where the replies to the judge's requests about the answers in `path` are kept until all have come."""
    return path.with_name(f"{path.stem}.judge-progress.json")


class Progress:
    """The replies ({reply_key: (score, how)}) kept as they come in progress_path(answers), so that a judge
    stopped or killed asks, when run again, only for the rest; without `answers`, kept in memory only."""

    def __init__(self, answers: Path | None = None, log=print):
        self.answers, self.replies = answers, {}
        self.path = progress_path(answers) if answers is not None else None
        self.rerun = f"python -m medqa.judge {answers}" if answers is not None else RERUN
        if self.path is not None and self.path.exists():
            self.replies = self._read(log)

    def _read(self, log) -> dict:
        """The kept replies; a damaged progress file only costs asking again."""
        try:
            kept = {k: (score, how) for k, (score, how) in read_json(self.path, "")["replies"].items()}
            if all((score is None or type(score) is int) and isinstance(how, str)
                   for score, how in kept.values()):
                return kept
        except (MedQAError, KeyError, TypeError, ValueError, AttributeError):
            pass
        log(f"note: {self.path.name} is damaged; the judge asks again for every reply it held.")
        return {}

    def keep(self, key: str, reply: tuple) -> None:
        """`reply` to the request `key`, on disk before the next request is made."""
        self.replies[key] = reply
        if self.path is not None:
            write_json_atomic(self.path, {"answers": self.answers.name, "replies": self.replies})

    def finish(self) -> None:
        """Every request has its reply in the answers file: nothing is left to resume."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _tasks(records: list[dict], n_anchors: int, seed: int) -> tuple[list, list[int]]:
    """(what, index, prompt) for every request, anchors first so that a reader can weigh the mean even if the
    budget runs out; and the seeded anchor items. Empty answers get no request."""
    rng = random.Random(seed)
    with_reference = [i for i, r in enumerate(records) if r["output"].strip()]
    anchors = rng.sample(with_reference, min(n_anchors, len(with_reference)))
    tasks = []
    for i in anchors:
        tasks.append(("self", i, judge_prompt(records[i], records[i]["output"])))
        others = [j for j in with_reference if records[j]["output"].strip() != records[i]["output"].strip()]
        if others:
            tasks.append(("other", i, judge_prompt(records[i], records[rng.choice(others)]["output"])))
    tasks += [("answer", i, judge_prompt(r, r["model_response"])) for i, r in enumerate(records)
              if r["model_response"].strip()]
    return tasks, anchors


def reply_key(model: str, options: dict, think, prompt: str) -> str:
    """What identifies a request: a kept reply is reused only for exactly the same question to the same
    judge."""
    asked = json.dumps([model, options, think, prompt], sort_keys=True)
    return hashlib.sha256(asked.encode()).hexdigest()[:32]


def _ask_all(ask, requests: list, budget: Budget, bar, progress: Progress) -> tuple[dict, str | None]:
    """`ask(prompt)` for each (key, prompt) until done, the budget or MAX_FAILURES_IN_ROW failures in a row;
    each reply is kept in `progress` as it comes. Returns {key: (score, how)} (how: the reason when score is
    None) and why it stopped early, if it did."""
    replies, failures_in_row = {}, 0
    for key, prompt in requests:
        if budget.spent():
            return replies, f"the time budget of {budget.seconds:g} s (JUDGE_BUDGET_S) ran out"
        try:
            reply = retry(lambda: ask(prompt), tries=TRIES, backoff=HOOKS.retry_wait_s, retry_on=(Transient,))
            failures_in_row = 0
        except JudgeUnavailable as err:
            return replies, str(err)
        except Unscored as err:  # no reply worth keeping: a re-run asks again
            reply = (None, str(err))
            failures_in_row += 1
        replies[key] = reply
        bar.update()
        if failures_in_row == 0:
            try:
                progress.keep(key, reply)
            except MedQAError as err:  # a full disk, say: stop, rather than ask for replies it cannot keep
                return replies, f"replies could not be kept ({err})"
        if failures_in_row >= MAX_FAILURES_IN_ROW:
            return replies, f"{failures_in_row} requests in a row failed (last: {reply[1]})"
    return replies, None


def _summarise(summary: Summary, records: list, tasks: list, replies: dict, keys: list, anchors: list):
    """Fill in the summary from the replies; the per-answer scores (empty answers 0, unasked None)."""
    scores: list[int | None] = [0 if not r["model_response"].strip() else None for r in records]
    reasons, sanity = Counter(), {"self": [], "other": []}
    for (what, i, _), key in zip(tasks, keys):
        score, how = replies.get(key, (None, "not asked"))
        if what == "answer":
            scores[i] = score
            summary.read_from_text += how == "text"
            reasons[how] += score is None
        elif score is not None:
            sanity[what].append(score)
    scored = [s for s in scores if s is not None]
    mean = {k: round(statistics.fmean(v), 2) if v else None for k, v in sanity.items()}
    summary.mean = round(statistics.fmean(scored), 2) if scored else None
    summary.median = statistics.median(scored) if scored else None
    summary.scored, summary.unscored = len(scored), len(records) - len(scored)
    summary.unscored_by_reason = {k: n for k, n in reasons.items() if n}
    summary.sanity = {**mean, "n": len(anchors)}
    return scores


def judge(records: list[dict], host: str, model: str, *, budget_s: float = DEFAULT_BUDGET_S,
          seed: int = DEFAULT_SEED, timeout_s: float = 120.0, log=print,
          progress: Progress | None = None) -> tuple[Summary, list]:
    """Score each `{instruction, input, output, model_response}` 0-100; (summary, per-answer scores or None).

    First N_ANCHORS seeded test items are judged twice more, as anchors: the reference answer against itself
    (a judge that can judge scores it high) and against another question's reference (it should score low).
    Empty answers score 0 without asking. Replies kept in `progress` are not asked again, and each new one is
    kept there. Requests stop when `budget_s` has passed, after MAX_FAILURES_IN_ROW failed requests in a row,
    or on Ctrl-C; one line then says why and how to judge again.
    """
    budget, progress = Budget(budget_s), progress or Progress()
    summary = Summary(model=model, n=len(records), unscored=len(records))
    tasks, anchors = _tasks(records, HOOKS.n_anchors, seed)
    try:
        host = check_ollama_host(host)
        limit, thinks = _check_model(host, model, min(timeout_s, CHECK_TIMEOUT_S))
    except (MedQAError, JudgeUnavailable) as err:
        log(f"LLM judge skipped: {str(err).rstrip('.')}. Judge later with `{progress.rerun}`.")
        summary.stopped, summary.unscored_by_reason = str(err), {"not asked": len(records)}
        summary.seconds = round(budget.elapsed(), 1)
        return summary, [None] * len(records)
    summary.empty_answers = sum(not r["model_response"].strip() for r in records)
    summary.num_ctx = context_size([p for _, _, p in tasks], limit)
    options = {"temperature": 0, "seed": seed, "num_ctx": summary.num_ctx, "num_predict": REPLY_TOKENS}
    # A thinking model would spend num_predict on its thoughts and leave the score empty; `think` is sent only
    # to models that can think, because Ollama refuses it (HTTP 400) for the others.
    think = False if thinks else None
    keys = [reply_key(model, options, think, p) for _, _, p in tasks]
    requests = [(k, p) for k, (_, _, p) in zip(keys, tasks) if k not in progress.replies]
    summary.too_long_for_context = sum(tokens_needed(p) > summary.num_ctx for _, _, p in tasks)
    summary.reused = len(tasks) - len(requests)
    # text on stdout, as training's bar: tqdm.auto would store a widget in the notebook, which GitHub cannot
    # show
    from tqdm.std import tqdm

    stopped, replies = None, {}
    with _client(host, timeout_s) as client, \
            tqdm(total=len(requests), desc=f"judging with {model}", unit="request", file=sys.stdout,
                 disable=not HOOKS.show_bar) as bar:
        try:
            replies, stopped = _ask_all(lambda prompt: _ask(client, host, model, prompt, options, think),
                                        requests, budget, bar, progress)
        except KeyboardInterrupt:
            stopped = INTERRUPTED
    scores = _summarise(summary, records, tasks, {**progress.replies, **replies}, keys, anchors)
    if stopped:
        asked = sum(key in progress.replies or key in replies for key, _ in requests)
        not_asked = summary.unscored_by_reason.get("not asked", 0)
        log(f"LLM judge stopped after {asked} of {len(requests)} requests: {stopped}. {not_asked} answers "
            f"were not judged; judge them later with `{progress.rerun}`.")
    summary.stopped, summary.requests_left = stopped, sum(key not in progress.replies for key in keys)
    summary.seconds = round(budget.elapsed(), 1)
    return summary, scores


def describe(summary: Summary) -> str:
    """The summary in words, for the notebook and the command line."""
    about = f" on {summary.answers}" if summary.answers else ""
    if summary.sanity is None:
        return f"LLM judge ({summary.model}){about}: not run, so its mean and sanity anchors are null."
    sanity, empty = summary.sanity, summary.empty_answers
    empty = f" ({empty} empty answers scored 0 without asking)" if empty else ""
    lines = [f"LLM judge ({summary.model}){about}: mean {summary.mean} over {summary.scored} of "
             f"{summary.n} answers{empty}",
             f"  sanity on {sanity['n']} test items: reference judged against itself {sanity['self']}, "
             f"against another question's reference {sanity['other']}"]
    if summary.reused:
        lines.append(f"  {summary.reused} replies kept from an earlier, unfinished judging")
    if summary.unscored:
        lines.append(f"  unscored: {summary.unscored_by_reason}")
    if summary.too_long_for_context:
        lines.append(f"  {summary.too_long_for_context} prompts longer than num_ctx={summary.num_ctx} "
                     f"(cut by the server)")
    return "\n".join(lines)


# ---------------------------------------------------------------- the answers file

def load_answers(path) -> list[dict]:
    """The records of an answers file (`test_responses.json`), checked; a MedQAError names what is wrong."""
    path = Path(path)
    hint = "pass the answers file the notebook writes, OUTPUT_DIR/test_responses.json"
    if path.is_dir():
        inside = path / "test_responses.json"
        raise MedQAError(f"{path} is a folder: " + (f"pass the answers file in it, {inside}."
                                                    if inside.exists() else f"{hint}."))
    if not path.exists():
        raise MedQAError(f"{path} does not exist: {hint}.")
    records = read_json(path, f"Fix: {hint}.")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise MedQAError(f"{path} is not a list of answers (JSON objects with fields {list(FIELDS)}): "
                         f"{hint}.")
    for n, record in enumerate(records):
        bad = [f for f in FIELDS if not isinstance(record.get(f), str)]
        if bad or not isinstance(record.get("input", ""), str):
            raise MedQAError(f"{path}: answer {n} lacks text field(s) {bad or ['input']} (each answer needs "
                             f"{list(FIELDS)} as text): {hint}.")
    return records


def _read_metrics(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        metrics = read_json(path, "")
    except MedQAError as err:  # not JSON, not text, a folder by that name, no permission, ...
        raise MedQAError(f"{path} is damaged or unreadable ({err.problem}): move it away (a new one is "
                         f"written) or restore it.") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("evaluation", {}), dict):
        raise MedQAError(f"{path} is not a metrics file of this project: move it away or restore it.")
    return metrics


def _record_result(metrics: dict, summary: Summary) -> None:
    """The judge's result for its answers file into metrics.json's evaluation.judge; the rest stays. A result
    that is not keyed by an answers file (it names its model and mean itself) is kept under UNRECORDED."""
    evaluation = metrics.get("evaluation")
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    judged = evaluation.get("judge")
    judged = {} if not isinstance(judged, dict) else {UNRECORDED: judged} \
        if "model" in judged and "mean" in judged else judged
    metrics["evaluation"] = {**evaluation, "judge": {**judged, summary.answers: asdict(summary)}}


def judge_answers(path, host: str, model: str, *, budget_s: float = DEFAULT_BUDGET_S,
                  seed: int = DEFAULT_SEED, timeout_s: float = 120.0, log=print) -> tuple[Summary, list]:
    """judge_file's work; a MedQAError says what is wrong with the files (the command line exits 2 on it)."""
    path = Path(path)
    records = load_answers(path)
    metrics_path = path.with_name("metrics.json")
    _read_metrics(metrics_path)
    progress = Progress(path, log)
    summary, scores = judge(records, host, model, budget_s=budget_s, seed=seed, timeout_s=timeout_s, log=log,
                            progress=progress)
    summary.answers = path.name
    earlier = any(r.get("judge_score") is not None for r in records)
    if summary.scored - summary.empty_answers == 0 and earlier:
        log(f"Kept the earlier judge scores in {path} and {metrics_path.name}.")
        return summary, scores
    for record, score in zip(records, scores):
        record["judge_score"] = score
    write_json_atomic(path, records)
    update_json(metrics_path, partial(_record_result, summary=summary))
    if summary.requests_left == 0:  # every reply is in the files: nothing to resume
        progress.finish()
    return summary, scores


def judge_file(path, host: str, model: str, *, budget_s: float = DEFAULT_BUDGET_S, seed: int = DEFAULT_SEED,
               timeout_s: float = 120.0, log=print) -> tuple[Summary, list]:
    """Judge the answers in `path` and write the scores back: `judge_score` into each answer of `path`, the
    summary into `metrics.json` beside it under `evaluation.judge[<file name>]` (the rest is kept).

    Both files are checked before any request and written atomically afterwards; replies are kept as they come
    (Progress). A judging that scored nothing never replaces earlier judge scores. Never raises: whatever goes
    wrong is one line and a summary that says so. Returns (summary, per-answer scores).
    """
    try:
        return judge_answers(path, host, model, budget_s=budget_s, seed=seed, timeout_s=timeout_s, log=log)
    except Exception as err:  # noqa: BLE001 -- the judge is optional: a finished run never fails in it
        reason = str(err) if isinstance(err, MedQAError) else f"{type(err).__name__}: {err}"
        log(f"LLM judge skipped: {reason}")
        return Summary(answers=Path(path).name, model=model, stopped=reason), []


def _host(given: str | None) -> str:
    """--host, else $OLLAMA_HOST, else the default, checked under the name the user gave it."""
    if given is not None:
        return check_ollama_host(given, "--host")
    if os.environ.get("OLLAMA_HOST"):
        return check_ollama_host(os.environ["OLLAMA_HOST"])
    return DEFAULT_HOST


def main(argv=None) -> int:
    """`python -m medqa.judge`: judge an answers file; the exit status says how it went (docs/judge.md)."""
    parser = argparse.ArgumentParser(
        prog="python -m medqa.judge",
        description="Score the answers of a finished run with an LLM judge served by Ollama, and write the "
                    "scores back into the answers file and into metrics.json beside it (one result per "
                    "answers file). Replies are kept as they come: after a kill or Ctrl-C, run it again to "
                    "ask only for the rest.")
    parser.add_argument("answers", help="the run's answers file, OUTPUT_DIR/test_responses.json")
    parser.add_argument("--model", help="Ollama model that judges (default: the run's JUDGE_MODEL from "
                                        f"metrics.json, else {DEFAULT_MODEL})")
    parser.add_argument("--host", help=f"where Ollama runs (default: $OLLAMA_HOST, else {DEFAULT_HOST})")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds the judge may take in all before it stops asking "
                             "(default: %(default)g)")
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="seconds one request may take (default: %(default)g)")
    parser.add_argument("--seed", type=int,
                        help="seed of the judge and of the sanity items (default: the run's SEED)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0) or not args.timeout_s > 0:
        parser.error("--budget-s and --timeout-s must be positive numbers of seconds")
    path = Path(args.answers)
    try:
        host = _host(args.host)
        run = (_read_metrics(path.with_name("metrics.json")) if path.is_file() else {}).get("settings")
        run = run if isinstance(run, dict) else {}
        summary, _ = judge_answers(path, host, args.model or run.get("JUDGE_MODEL") or DEFAULT_MODEL,
                                   budget_s=args.budget_s, seed=args.seed if args.seed is not None else
                                   run.get("SEED", DEFAULT_SEED), timeout_s=args.timeout_s)
    except MedQAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside the requests (reading or writing the files): nothing was half-written
        print("stopped (Ctrl-C): the files are as they were before this step.", file=sys.stderr)
        return 130
    if summary.stopped == INTERRUPTED:
        return 130  # the judge's one line said what was kept and how to go on
    print(describe(summary))
    return 1 if summary.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
