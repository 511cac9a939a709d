"""An LLM served by Ollama scores each answer 0-100 against the reference, after the run is saved: judge_file
in the notebook, `python -m medqa.judge OUTPUT_DIR/test_responses.json` on the command line. It never raises
into a finished run; replies are kept as they come, so a judge run again asks only for what is missing."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from tqdm.std import tqdm  # text, as training's bar: tqdm.auto would store a widget that GitHub cannot show

from medqa import ollama_api
from medqa.errors import MedQAError, retry
from medqa.judge_files import Progress, load_answers, read_metrics, record_result
from medqa.ollama_api import (REPLY_TOKENS, JudgeUnavailable, Transient, Unscored, check_ollama_host,
                              context_size, tokens_needed)
from medqa.store import update_json, write_json_atomic

JUDGE_PROMPT = ("Given the input `{question}` and correct output `{reference}`, score the model response "
                "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                'Respond with JSON only, in the form {{"score": <integer from 0 to 100>}}.')
# The project's defaults (settings.COMMON holds the same values for the notebook).
DEFAULT_MODEL, DEFAULT_HOST, DEFAULT_BUDGET_S, DEFAULT_SEED = "llama3", ollama_api.DEFAULT_HOST, 3600.0, 123
N_ANCHORS = 5                # test items judged twice more (reference against itself / another reference)
MAX_FAILURES_IN_ROW = 3      # requests that failed one after another before the judge stops asking
TRIES = 3                    # per request, for server errors and dropped connections only
CHECK_TIMEOUT_S = 10.0       # /api/show answers at once, so a host that never answers is found in seconds
INTERRUPTED = "interrupted (Ctrl-C)"


def judge_prompt(record: dict, response: str) -> str:
    """The judge's question about `response` to `record`'s question, against its reference answer."""
    question = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return JUDGE_PROMPT.format(question=question, reference=record["output"], response=response)


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


def _tasks(records: list[dict], n_anchors: int, seed: int) -> list[tuple[str, int, str]]:
    """(what, index, prompt) for every request, the seeded anchors first, so that a reader can weigh the mean
    even if the budget runs out. Empty answers get no request."""
    rng = random.Random(seed)
    with_reference = [i for i, r in enumerate(records) if r["output"].strip()]
    tasks = []
    for i in rng.sample(with_reference, min(n_anchors, len(with_reference))):
        tasks.append(("self", i, judge_prompt(records[i], records[i]["output"])))
        others = [j for j in with_reference if records[j]["output"].strip() != records[i]["output"].strip()]
        if others:
            tasks.append(("other", i, judge_prompt(records[i], records[rng.choice(others)]["output"])))
    return tasks + [("answer", i, judge_prompt(r, r["model_response"])) for i, r in enumerate(records)
                    if r["model_response"].strip()]


def reply_key(model: str, options: dict, think, prompt: str) -> str:
    """What identifies a request: a kept reply is reused only for the same question to the same judge."""
    asked = json.dumps([model, options, think, prompt], sort_keys=True)
    return hashlib.sha256(asked.encode()).hexdigest()[:32]


def _ask_all(ask, requests: list, budget: Budget, bar, progress: Progress) -> tuple[dict, str | None]:
    """`ask(prompt)` for each (key, prompt), each reply kept in `progress` as it comes, until done, the budget
    or MAX_FAILURES_IN_ROW failures in a row; {key: (score, how)} and why it stopped early, if it did."""
    replies, failures_in_row = {}, 0
    for key, prompt in requests:
        if budget.elapsed() >= budget.seconds:
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


def _summarise(summary: Summary, records: list, tasks: list, replies: dict, keys: list) -> list:
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
    summary.mean = round(statistics.fmean(scored), 2) if scored else None
    summary.median = statistics.median(scored) if scored else None
    summary.scored, summary.unscored = len(scored), len(records) - len(scored)
    summary.unscored_by_reason = {k: n for k, n in reasons.items() if n}
    summary.sanity = {**{k: round(statistics.fmean(v), 2) if v else None for k, v in sanity.items()},
                      "n": sum(what == "self" for what, _, _ in tasks)}
    return scores


def judge(records: list[dict], host: str, model: str, *, budget_s: float = DEFAULT_BUDGET_S,
          seed: int = DEFAULT_SEED, timeout_s: float = 120.0, log=print,
          progress: Progress | None = None) -> tuple[Summary, list]:
    """Score each `{instruction, input, output, model_response}` 0-100; (summary, per-answer scores or None).

    N_ANCHORS seeded items are judged twice more: the reference against itself (a judge that can judge scores
    it high) and against another question's (low). Empty answers score 0 without asking; replies in
    `progress` are not asked again. Requests stop at `budget_s`, after MAX_FAILURES_IN_ROW failures in a row
    or on Ctrl-C, and one line says why and how to judge again."""
    budget, progress = Budget(budget_s), progress or Progress()
    summary = Summary(model=model, n=len(records), unscored=len(records))
    tasks = _tasks(records, HOOKS.n_anchors, seed)
    try:
        host = check_ollama_host(host)
        limit, thinks = ollama_api.check_model(host, model, min(timeout_s, CHECK_TIMEOUT_S))
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
    stopped, replies = None, {}
    with (ollama_api.client(host, timeout_s) as client,
          tqdm(total=len(requests), desc=f"judging with {model}", unit="request", file=sys.stdout,
               disable=not HOOKS.show_bar) as bar):
        try:
            ask = lambda prompt: ollama_api.ask(client, host, model, prompt, options, think)  # noqa: E731
            replies, stopped = _ask_all(ask, requests, budget, bar, progress)
        except KeyboardInterrupt:
            stopped = INTERRUPTED
    scores = _summarise(summary, records, tasks, {**progress.replies, **replies}, keys)
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


def judge_answers(path, host: str, model: str, *, budget_s: float = DEFAULT_BUDGET_S,
                  seed: int = DEFAULT_SEED, timeout_s: float = 120.0, log=print) -> tuple[Summary, list]:
    """judge_file's work; a MedQAError says what is wrong with the files (the command line exits 2 on it)."""
    path = Path(path)
    records = load_answers(path)
    metrics_path = path.with_name("metrics.json")
    read_metrics(metrics_path)
    progress = Progress(path, log)
    summary, scores = judge(records, host, model, budget_s=budget_s, seed=seed, timeout_s=timeout_s, log=log,
                            progress=progress)
    summary.answers = path.name
    earlier = any(r.get("judge_score") is not None for r in records)
    if summary.scored - summary.empty_answers == 0 and earlier:
        log(f"Kept the earlier judge scores in {path} and {metrics_path.name}.")
        return summary, scores
    write_json_atomic(path, [{**record, "judge_score": score} for record, score in zip(records, scores)])
    update_json(metrics_path, partial(record_result, summary=asdict(summary)))
    if summary.requests_left == 0:  # every reply is in the files: nothing to resume
        progress.finish()
    return summary, scores


def judge_file(path, host: str, model: str, *, budget_s: float = DEFAULT_BUDGET_S, seed: int = DEFAULT_SEED,
               timeout_s: float = 120.0, log=print) -> tuple[Summary, list]:
    """Judge the answers in `path`: `judge_score` into each answer, the summary into metrics.json beside it
    under evaluation.judge[<file name>]; (summary, per-answer scores). A judging that scored nothing keeps
    earlier judge scores. Never raises: whatever goes wrong is one line and a summary that says so."""
    try:
        return judge_answers(path, host, model, budget_s=budget_s, seed=seed, timeout_s=timeout_s, log=log)
    except Exception as err:  # noqa: BLE001 -- the judge is optional: a finished run never fails in it
        reason = str(err) if isinstance(err, MedQAError) else f"{type(err).__name__}: {err}"
        log(f"LLM judge skipped: {reason}")
        return Summary(answers=Path(path).name, model=model, stopped=reason), []


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
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds the judge may "
                        "take in all before it stops asking (default: %(default)g)")
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="seconds one request may take (default: %(default)g)")
    parser.add_argument("--seed", type=int, help="seed of the judge and of the sanity items (default: the "
                                                 "run's SEED)")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.budget_s) and args.budget_s > 0) or not args.timeout_s > 0:
        parser.error("--budget-s and --timeout-s must be positive numbers of seconds")
    path = Path(args.answers)
    try:
        host = (check_ollama_host(args.host, "--host") if args.host is not None  # else Ollama's own variable
                else check_ollama_host(os.environ.get("OLLAMA_HOST") or DEFAULT_HOST))
        run = (read_metrics(path.with_name("metrics.json")) if path.is_file() else {}).get("settings")
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
