"""Step 13 (optional): a model served by Ollama scores each answer 0-100 against the reference.

The notebook and the command line share one code path, `judge_file`:

    python -m medqa.judge OUTPUT_DIR/test_responses.json [--model llama3] [--host URL] [--budget-s 3600]

Nothing here raises because of Ollama: a judge that cannot run, stops early or gets unreadable replies prints one
line and returns a summary that says so (scores it could not get are None, counted by reason).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from medqa.errors import MedQAError, retry
from medqa.settings import COMMON
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
N_ANCHORS = 5                # test items judged twice more (reference against itself / another reference)
MAX_FAILURES_IN_ROW = 3      # requests that failed one after another before the judge stops asking
TRIES = 3                    # per request, for server errors and dropped connections only
CHECK_TIMEOUT_S = 10.0       # /api/show answers at once, so a host that never answers is found in seconds
REPLY_TOKENS = 128           # room for the chat template and the reply (num_predict caps the reply)
DEFAULT_CONTEXT = 8192       # when the server does not say the model's context length (llama3's)
RERUN = "python -m medqa.judge OUTPUT_DIR/test_responses.json"


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
    another scale ("8/10") is refused rather than rescaled (the judge was asked for 0-100, and a rescaled guess
    would sit between real scores unseen), and so is a reply with two different candidate scores.
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
    question = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return JUDGE_PROMPT.format(question=question, reference=record["output"], response=response)


def tokens_needed(prompt: str) -> int:
    """The context a request needs: about 3 characters a token (on the safe side for English), plus the reply."""
    return len(prompt) // 3 + REPLY_TOKENS


def context_size(prompts: list[str], limit: int) -> int:
    """num_ctx for the whole run: what the longest prompt needs, as a power of two from 2048, at most `limit`.
    One size for all requests, because Ollama reloads the model whenever num_ctx changes; without it the
    server's default context (2048 or 4096) cuts long references silently."""
    needed = max((tokens_needed(p) for p in prompts), default=REPLY_TOKENS)
    return min(max(2048, 1 << (needed - 1).bit_length()), limit)


def _client(host: str, timeout_s: float):
    import ollama

    return ollama.Client(host=host, timeout=timeout_s)


def _check_model(host: str, model: str, timeout_s: float) -> tuple[int, bool]:
    """Fail fast, before the progress bar: is Ollama there, does it have the model? Returns the model's context
    length and whether it thinks before answering."""
    import httpx
    import ollama

    try:
        with _client(host, timeout_s) as client:
            shown = client.show(model)
    except ConnectionError:
        raise JudgeUnavailable(f"Ollama is not reachable at {host}: start it with `ollama serve` (and "
                               f"`ollama pull {model}`), or set OLLAMA_HOST to where it runs") from None
    except ollama.ResponseError as err:
        if err.status_code == 404:
            raise JudgeUnavailable(f"Ollama at {host} has no model {model!r}: run `ollama pull {model}` "
                                   f"(or check that OLLAMA_HOST points at Ollama)") from None
        raise JudgeUnavailable(f"Ollama at {host} answered HTTP {err.status_code} ({err.error}) when asked "
                               f"about model {model!r}") from None
    except httpx.TimeoutException:
        raise JudgeUnavailable(f"{host} accepted the connection but did not answer within {timeout_s:g} s: "
                               f"is Ollama running there, and not stuck?") from None
    except Exception as err:  # noqa: BLE001 -- whatever else the host does, the run must go on
        raise JudgeUnavailable(f"{host} did not answer like Ollama ({type(err).__name__}: {err})") from None
    lengths = [v for k, v in (shown.modelinfo or {}).items() if k.endswith(".context_length") and isinstance(v, int)]
    return (lengths[0] if lengths else DEFAULT_CONTEXT), "thinking" in (shown.capabilities or [])


def _ask(client, host: str, model: str, prompt: str, options: dict, think) -> tuple[int | None, str]:
    """One chat request, its failures sorted into reasons; a score (or None) and how it was read."""
    import httpx
    import ollama
    import pydantic

    try:
        reply = client.chat(model, messages=[{"role": "user", "content": prompt}], format=SCORE_SCHEMA,
                            options=options, think=think)
    except ConnectionError:
        raise JudgeUnavailable(f"Ollama stopped answering at {host} (connection refused): start it again with "
                               f"`ollama serve`") from None
    except ollama.ResponseError as err:
        if err.status_code == 404:
            raise JudgeUnavailable(f"Ollama at {host} no longer has model {model!r}: run `ollama pull {model}`") \
                from None
        kind = Transient if err.status_code >= 500 or err.status_code == 429 else Unscored
        raise kind(f"HTTP {err.status_code}") from None
    except httpx.TimeoutException:
        raise Unscored("timeout") from None  # not retried: a server that hangs once mostly hangs again
    except httpx.TransportError as err:
        raise Transient(f"connection failed ({type(err).__name__})") from None
    except json.JSONDecodeError:
        raise Unscored("reply not JSON") from None
    except (pydantic.ValidationError, TypeError):
        raise Unscored("unexpected reply shape") from None
    except Exception as err:  # noqa: BLE001 -- the judge is optional: count it, never raise into the run
        raise Unscored(f"unexpected error ({type(err).__name__})") from None
    return read_score(reply.message.content)


# ---------------------------------------------------------------- judging a list of answers

def judge(records: list[dict], host: str, model: str, *, budget_s: float = COMMON["JUDGE_BUDGET_S"],
          seed: int = COMMON["SEED"], timeout_s: float = 120.0, n_anchors: int = N_ANCHORS, retry_wait_s=1.0,
          rerun: str = RERUN, log=print, clock=time.monotonic, progress: bool = True) -> tuple[dict, list]:
    """Score each `{instruction, input, output, model_response}` 0-100; (summary, per-answer scores or None).

    First `n_anchors` seeded test items are judged twice more, as anchors: the reference answer against itself
    (a judge that can judge scores it high) and against another question's reference (it should score low).
    Empty answers score 0 without asking. Requests stop when `budget_s` has passed or after
    MAX_FAILURES_IN_ROW failed requests in a row; one line then says why and how to judge again (`rerun`).
    """
    from tqdm.std import tqdm  # text on stdout, as training's bar: tqdm.auto would store a widget in the notebook,
    #                            which GitHub cannot show

    start = clock()
    scores: list[int | None] = [None] * len(records)
    reasons: Counter = Counter()
    summary = {"model": model, "mean": None, "median": None, "n": len(records), "scored": 0,
               "unscored": len(records), "unscored_by_reason": {}, "empty_answers": 0, "read_from_text": 0,
               "num_ctx": None, "too_long_for_context": 0, "sanity": None, "stopped": None, "seconds": None}
    try:
        limit, thinks = _check_model(host, model, min(timeout_s, CHECK_TIMEOUT_S))
    except JudgeUnavailable as err:
        log(f"LLM judge skipped: {err}. Judge later with `{rerun}`.")
        summary.update(stopped=str(err), unscored_by_reason={"not asked": len(records)},
                       seconds=round(clock() - start, 1))
        return summary, scores

    # (what, index, prompt): anchors first, so that a reader can weigh the mean even if the budget runs out.
    rng = random.Random(seed)
    with_reference = [i for i, r in enumerate(records) if r["output"].strip()]
    anchors = rng.sample(with_reference, min(n_anchors, len(with_reference)))
    tasks = []
    for i in anchors:
        tasks.append(("self", i, judge_prompt(records[i], records[i]["output"])))
        others = [j for j in with_reference if records[j]["output"].strip() != records[i]["output"].strip()]
        if others:
            tasks.append(("other", i, judge_prompt(records[i], records[rng.choice(others)]["output"])))
    for i, r in enumerate(records):
        if r["model_response"].strip():
            tasks.append(("answer", i, judge_prompt(r, r["model_response"])))
        else:
            scores[i] = 0  # nothing to judge; asking would only cost time
            summary["empty_answers"] += 1

    num_ctx = context_size([p for _, _, p in tasks], limit)
    summary["num_ctx"] = num_ctx
    summary["too_long_for_context"] = sum(tokens_needed(p) > num_ctx for _, _, p in tasks)
    options = {"temperature": 0, "seed": seed, "num_ctx": num_ctx, "num_predict": REPLY_TOKENS}
    # A thinking model would spend num_predict on its thoughts and leave the score empty; `think` is sent only to
    # models that can think, because Ollama refuses it (HTTP 400) for the others.
    think = False if thinks else None
    sanity = {"self": [], "other": []}
    failures_in_row, asked, stopped = 0, 0, None
    with _client(host, timeout_s) as client, \
            tqdm(total=len(tasks), desc=f"judging with {model}", unit="request", file=sys.stdout,
                 disable=not progress) as bar:
        for what, i, prompt in tasks:
            if clock() - start >= budget_s:
                stopped = f"the time budget of {budget_s:g} s (JUDGE_BUDGET_S) ran out"
                break
            try:
                score, how = retry(lambda: _ask(client, host, model, prompt, options, think), tries=TRIES,
                                   backoff=retry_wait_s, retry_on=(Transient,))
                failures_in_row = 0
            except JudgeUnavailable as err:
                stopped = str(err)
                break
            except Unscored as err:
                score, how = None, str(err)
                failures_in_row += 1
            asked += 1
            bar.update()
            if what == "answer":
                scores[i] = score
                summary["read_from_text"] += how == "text"
                if score is None:
                    reasons[how] += 1
            elif score is not None:
                sanity[what].append(score)
            if failures_in_row >= MAX_FAILURES_IN_ROW:
                stopped = f"{failures_in_row} requests in a row failed (last: {how})"
                break

    not_asked = sum(s is None for s in scores) - sum(reasons.values())
    if not_asked:
        reasons["not asked"] = not_asked
    if stopped:
        log(f"LLM judge stopped after {asked} of {len(tasks)} requests: {stopped}. {not_asked} answers were not "
            f"judged; judge them later with `{rerun}`.")
    scored = [s for s in scores if s is not None]
    mean = {k: round(statistics.fmean(v), 2) if v else None for k, v in sanity.items()}
    summary.update(mean=round(statistics.fmean(scored), 2) if scored else None,
                   median=statistics.median(scored) if scored else None, scored=len(scored),
                   unscored=len(records) - len(scored), unscored_by_reason=dict(reasons),
                   sanity={**mean, "n": len(anchors)}, stopped=stopped, seconds=round(clock() - start, 1))
    return summary, scores


def describe(summary: dict) -> str:
    """The summary in words, for the notebook and the command line."""
    if summary["sanity"] is None:
        return f"LLM judge ({summary['model']}): not run, so its mean and sanity anchors are null."
    s = summary["sanity"]
    empty = f" ({summary['empty_answers']} empty answers scored 0 without asking)" if summary["empty_answers"] else ""
    lines = [f"LLM judge ({summary['model']}): mean {summary['mean']} over {summary['scored']} of "
             f"{summary['n']} answers{empty}",
             f"  sanity on {s['n']} test items: reference judged against itself {s['self']}, against another "
             f"question's reference {s['other']}"]
    if summary["unscored"]:
        lines.append(f"  unscored: {summary['unscored_by_reason']}")
    if summary["too_long_for_context"]:
        lines.append(f"  {summary['too_long_for_context']} prompts longer than num_ctx={summary['num_ctx']} "
                     f"(cut by the server)")
    return "\n".join(lines)


# ---------------------------------------------------------------- the answers file

def load_answers(path) -> list[dict]:
    """The records of an answers file (`test_responses.json`), checked; a MedQAError names what is wrong."""
    path = Path(path)
    hint = "pass the answers file the notebook writes, OUTPUT_DIR/test_responses.json"
    if path.is_dir():
        inside = path / "test_responses.json"
        raise MedQAError(f"{path} is a folder: " + (f"pass the answers file in it, {inside}." if inside.exists()
                                                    else f"{hint}."))
    if not path.exists():
        raise MedQAError(f"{path} does not exist: {hint}.")
    records = read_json(path, f"Fix: {hint}.")
    if not isinstance(records, list) or not records or not all(isinstance(r, dict) for r in records):
        raise MedQAError(f"{path} is not a list of answers (JSON objects with fields {list(FIELDS)}): {hint}.")
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
        raise MedQAError(f"{path} is damaged or unreadable ({str(err).split(': it was')[0]}): move it away (a new "
                         f"one is written) or restore it.") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("evaluation", {}), dict):
        raise MedQAError(f"{path} is not a metrics file of this project: move it away or restore it.")
    return metrics


def judge_file(path, host: str, model: str, *, budget_s: float = COMMON["JUDGE_BUDGET_S"],
               seed: int = COMMON["SEED"], **options) -> tuple[dict, list]:
    """Judge the answers in `path` and write the scores back: `judge_score` into each answer of `path`, the
    summary into `metrics.json` beside it as `evaluation.judge` (the rest of `evaluation` is kept).

    Both files are checked before any request and written atomically afterwards. A judging that scored nothing
    never replaces earlier judge scores. Returns (summary, per-answer scores); `options` go to `judge`.
    """
    path = Path(path)
    records = load_answers(path)
    metrics_path = path.with_name("metrics.json")
    _read_metrics(metrics_path)
    summary, scores = judge(records, host, model, budget_s=budget_s, seed=seed,
                            rerun=f"python -m medqa.judge {path}", **options)
    if summary["scored"] - summary["empty_answers"] == 0 and any(r.get("judge_score") is not None for r in records):
        options.get("log", print)(f"Kept the earlier judge scores in {path} and {metrics_path.name}.")
        return summary, scores
    for record, score in zip(records, scores):
        record["judge_score"] = score
    write_json_atomic(path, records)
    # update_json merges at the top level only: merge into "evaluation" here, so "after" and "before" stay.
    evaluation = _read_metrics(metrics_path).get("evaluation", {})
    update_json(metrics_path, evaluation={**evaluation, "judge": summary})
    return summary, scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medqa.judge",
        description="Score the answers of a finished run with an LLM judge served by Ollama, and write the scores "
                    "back into the answers file and into metrics.json beside it.")
    parser.add_argument("answers", help="the run's answers file, OUTPUT_DIR/test_responses.json")
    parser.add_argument("--model", help="Ollama model that judges (default: the run's JUDGE_MODEL from metrics.json, "
                                        f"else {COMMON['JUDGE_MODEL']})")
    parser.add_argument("--host", default=os.environ.get("OLLAMA_HOST") or COMMON["OLLAMA_HOST"],
                        help=f"where Ollama runs (default: $OLLAMA_HOST, else {COMMON['OLLAMA_HOST']})")
    parser.add_argument("--budget-s", type=float, default=COMMON["JUDGE_BUDGET_S"],
                        help="seconds the judge may take in all before it stops asking (default: %(default)g)")
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="seconds one request may take (default: %(default)g)")
    parser.add_argument("--seed", type=int, help="seed of the judge and of the sanity items (default: the run's SEED)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0) or not args.timeout_s > 0:
        parser.error("--budget-s and --timeout-s must be positive numbers of seconds")
    path = Path(args.answers)
    try:
        run = (_read_metrics(path.with_name("metrics.json")) if path.is_file() else {}).get("settings")
        run = run if isinstance(run, dict) else {}
        summary, _ = judge_file(path, args.host, args.model or run.get("JUDGE_MODEL") or COMMON["JUDGE_MODEL"],
                                budget_s=args.budget_s, seed=args.seed if args.seed is not None else
                                run.get("SEED", COMMON["SEED"]), timeout_s=args.timeout_s)
    except MedQAError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(summary))
    return 1 if summary["stopped"] else 0


if __name__ == "__main__":
    sys.exit(main())
