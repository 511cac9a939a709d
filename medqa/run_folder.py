"""The run folder (OUTPUT_DIR): one process runs in it at a time, holding its lock (flock, which the operating
system drops with a killed process), and a run goes on there only from a run it can continue exactly."""

import datetime
import os
import socket
from pathlib import Path

from medqa import store
from medqa.errors import MedQAError, UnreadableFile

LOCK_NAME = ".medqa-run.lock"        # locked while a process runs in the folder
HOLDER_NAME = ".medqa-run-holder.json"  # which process that is, for the message a second run gets
# What claim records beside the settings: what the data file and the model source were, and their setting.
FINGERPRINTS = {"DATA_FINGERPRINT": ("the data file", "DATA_PATH"),
                "MODEL_FINGERPRINT": ("the model (MODEL's weights)", "MODEL")}

# folder -> (its lock, the lock file's identity): one per folder and process, as flock is per open file
_held: dict[Path, tuple] = {}


def claim(out_dir, signature: dict, overwrite: bool, data_file=None, model_source=None) -> Path:
    """Make `out_dir` the run's, recording `signature` and the inputs' fingerprints in run.json. Refused: a
    run there that this one cannot continue (unless `overwrite`), a folder another process holds (always)."""
    out = Path(out_dir)
    sources = {"DATA_PATH": data_file, "MODEL": model_source}
    mine = dict(signature, **{key: store.fingerprint(sources[setting])
                              for key, (_, setting) in FINGERPRINTS.items() if sources[setting] is not None})
    new_lock = not (out / LOCK_NAME).exists()
    if new_lock:  # checked before the lock file is made, so that a refusal leaves no trace
        _problems_or_refuse(out, mine, overwrite, sources)
    held_before = out.resolve() in _held
    hold(out)
    try:
        problems = _problems_or_refuse(out, mine, overwrite, sources)  # again, under the lock
        store.discard_run(out, litter_only=not problems)
        store.write_json_atomic(out / "run.json", mine)
    except BaseException:
        if not held_before:
            release(out, remove=new_lock)
        raise
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    store.write_json_atomic(out / HOLDER_NAME, {"pid": os.getpid(), "host": socket.gethostname(),
                                                "since": since})
    for other in [folder for folder in _held if folder != out.resolve()]:
        release(other)  # a process runs one run at a time: the folder it claimed before is free again
    return out


def _problems_or_refuse(out: Path, mine: dict, overwrite: bool, sources: dict) -> list[str]:
    """Why the run in `out` cannot simply continue as the run `mine`; refused unless `overwrite` may replace
    it, and never when that would delete the user's own files."""
    problems = _run_problems(out, mine, sources) if out.is_dir() else []
    if not problems:
        return problems
    if not overwrite:
        raise MedQAError(f"OUTPUT_DIR={str(out)!r} holds a run this one cannot continue: "
                         f"{'; '.join(problems)}. To keep it, set OUTPUT_DIR to another folder; to replace "
                         "it, set OVERWRITE=True.")
    if not (out / "run.json").exists():
        raise MedQAError(f"OUTPUT_DIR={str(out)!r} holds files named like a run's but no run.json, so they "
                         "are not a run of this notebook and OVERWRITE=True does not delete them: set "
                         f"OUTPUT_DIR to another folder (or move those files away).")
    discarded = [(out / name).resolve() for name in store.RUN_FILES]
    for label, source in sources.items():
        if source is None or not Path(source).exists():
            continue
        inside = Path(source).resolve()
        if any(inside == d or d in inside.parents for d in discarded):
            raise MedQAError(f"{label}={str(source)!r} lies inside OUTPUT_DIR={str(out)!r} where the old "
                             "run's files are, and OVERWRITE=True would delete it: copy it elsewhere (or "
                             f"set OUTPUT_DIR to another folder) first.")
    return problems


def _run_problems(out: Path, mine: dict, sources: dict) -> list[str]:
    """Why the run in OUTPUT_DIR cannot simply continue as the run `mine`: other settings, changed inputs,
    damage. More EPOCHS continue a run (medqa.training_run.begin_schedule); fewer would redefine it."""
    record = out / "run.json"
    if not record.exists():
        left = [name for name in store.RUN_FILES if (out / name).exists()]
        return [f"files of a run without run.json ({', '.join(left)})"] if left else []
    try:
        theirs = store.read_json(record, "")
        damage = None if isinstance(theirs, dict) else f"{record} holds no JSON object"
    except UnreadableFile as err:
        damage = err.problem
    problems = [] if damage is None else [f"a damaged run.json ({damage})"]
    if damage is None:
        epochs = (theirs.get("EPOCHS"), mine.get("EPOCHS"))
        longer = all(isinstance(n, int) for n in epochs) and epochs[1] > epochs[0]
        differ = [f"{k}: {theirs.get(k)!r} there, {v!r} now" for k, v in mine.items()
                  if k not in FINGERPRINTS and theirs.get(k) != v and not (k == "EPOCHS" and longer)]
        if differ:
            problems.append(f"other settings ({', '.join(differ)})")
        problems += [f"{what} changed since that run began ({setting}: {str(sources[setting])!r}; "
                     f"{theirs[k]} there, {mine[k]} now)" for k, (what, setting) in FINGERPRINTS.items()
                     if k in theirs and k in mine and theirs[k] != mine[k]]
    if (out / "checkpoint.pt").is_file() and (problem := store.zip_problem(out / "checkpoint.pt")):
        problems.append(f"a damaged checkpoint.pt (it {problem})")
    if (out / "metrics.json").is_file():
        try:
            store.read_json(out / "metrics.json", "")
        except UnreadableFile as err:
            problems.append(f"a damaged metrics.json ({err.problem})")
    return problems


def hold(out_dir) -> None:
    """Lock `out_dir` (made if missing) for this process, or refuse at once, naming the process holding it."""
    import filelock

    out = Path(out_dir)
    if out.resolve() in _held:
        if _held[out.resolve()][1] == _identity(out / LOCK_NAME):
            return
        release(out)  # the folder was deleted (or its lock file): the lock held went with it
    try:
        with store.storage_errors(out / LOCK_NAME):
            out.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(out / LOCK_NAME, timeout=0)
            lock.acquire()
    except filelock.Timeout:
        try:
            record = store.read_json(out / HOLDER_NAME, "")
            who = f"process {record['pid']} on {record['host']}, since {record['since']}"
        except (UnreadableFile, KeyError, TypeError):
            who = "a process that has not yet recorded which it is"
        raise MedQAError(f"OUTPUT_DIR={str(out)!r} is in use by another run ({who}), and two runs "
                         "in one folder would overwrite each other's files: wait until it ends (a "
                         "notebook's kernel holds the folder until it is shut down), or set OUTPUT_DIR to "
                         "another folder.") from None
    _held[out.resolve()] = (lock, _identity(out / LOCK_NAME))


def _identity(path: Path) -> tuple | None:
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def release(out_dir, remove: bool = False) -> None:
    """Free `out_dir` for other processes; `remove` deletes the lock file too, for a claim that failed in a
    folder that had none."""
    lock, _ = _held.pop(Path(out_dir).resolve(), (None, None))
    if lock is not None:
        if remove:
            Path(out_dir, LOCK_NAME).unlink(missing_ok=True)
        lock.release()

