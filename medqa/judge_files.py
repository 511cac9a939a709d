"""The judge's files: the answers it reads, the progress file that keeps its replies until all have come, and
its result in metrics.json beside them (one per answers file, under evaluation.judge)."""

from __future__ import annotations

from pathlib import Path

from medqa.errors import MedQAError
from medqa.store import read_json, write_json_atomic

FIELDS = ("instruction", "output", "model_response")
RERUN = "python -m medqa.judge OUTPUT_DIR/test_responses.json"
UNRECORDED = "answers file not recorded"  # the key of a result under evaluation.judge that names no file


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
        if self.path is None or not self.path.exists():
            return
        try:  # a damaged progress file only costs asking again
            kept = {k: (score, how) for k, (score, how) in read_json(self.path, "")["replies"].items()}
        except (MedQAError, KeyError, TypeError, ValueError, AttributeError):
            kept = None
        if kept is not None and all((score is None or type(score) is int) and isinstance(how, str)
                                    for score, how in kept.values()):
            self.replies = kept
        else:
            log(f"note: {self.path.name} is damaged; the judge asks again for every reply it held.")

    def keep(self, key: str, reply: tuple) -> None:
        """`reply` to the request `key`, on disk before the next request is made."""
        self.replies[key] = reply
        if self.path is not None:
            write_json_atomic(self.path, {"answers": self.answers.name, "replies": self.replies})

    def finish(self) -> None:
        """Every request has its reply in the answers file: nothing is left to resume."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def load_answers(path) -> list[dict]:
    """The records of the answers file `path`, checked; a MedQAError names what is wrong."""
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


def read_metrics(path: Path) -> dict:
    """The metrics.json beside the answers ({} if there is none); a damaged one raises a MedQAError."""
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


def record_result(metrics: dict, summary: dict) -> None:
    """The judge's result for its answers file into metrics.json's evaluation.judge; the rest stays. A result
    that names its model and mean itself, not keyed by an answers file, is kept under UNRECORDED."""
    evaluation = metrics.get("evaluation")
    evaluation = evaluation if isinstance(evaluation, dict) else {}
    judged = evaluation.get("judge") if isinstance(evaluation.get("judge"), dict) else {}
    judged = {UNRECORDED: judged} if "model" in judged and "mean" in judged else judged
    metrics["evaluation"] = {**evaluation, "judge": {**judged, summary["answers"]: summary}}
