"""Writing results so that an interrupted or failed write leaves the old file or the new one, never half of
one, and reading them back with a clear error when a file is damaged.

Every file the project writes goes through `atomic_write`: a temporary file (or folder) beside the target,
flushed to disk and then renamed over it, removed on any error. A failure of the disk or the folder, whichever
library meets it (json, safetensors, torch.save, save_pretrained, matplotlib), becomes a `StorageError` that
names the file, the problem ("no space left on device", ...) and the fix (`storage_errors`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from medqa.errors import MedQAError, StorageError, UnreadableFile

# What a run writes into OUTPUT_DIR (run.json, which names the run, is rewritten by claim_output_dir).
RUN_FILES = ("checkpoint.pt", "metrics.json", "loss.png", "scores.png", "test_responses.json",
             "base_responses.json", "model", "splits")
TMP_PREFIX = ".tmp-"  # hidden, and the target's name stays at the end so that readers still see its extension

_WRITABLE = "make the folder writable (chmod u+w) or point OUTPUT_DIR elsewhere"
_READ_ONLY = ("read-only file system", "choose another OUTPUT_DIR, on a writable disk (chmod cannot make a "
                                       "read-only mount writable)")
# Failures of the file system, as (problem, fix). Only these become a StorageError: other OSErrors (a network
# error inside a download, say) stay what they are, for the caller to retry or report.
_FREE = "free some space (or point OUTPUT_DIR elsewhere) and run again"
_FIXES = {
    errno.ENOSPC: ("no space left on device", _FREE),
    errno.EDQUOT: ("disk quota exceeded", _FREE),
    errno.EFBIG: ("file too large for this file system", "point OUTPUT_DIR at another disk"),
    errno.EACCES: ("permission denied", _WRITABLE),
    errno.EPERM: ("operation not permitted", _WRITABLE),
    errno.EROFS: _READ_ONLY,
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "point OUTPUT_DIR at a folder, not a file"),
    errno.EISDIR: ("a folder stands where the file should go",
                   "move that folder away or choose another OUTPUT_DIR"),
    errno.EEXIST: ("a file stands where a folder should go",
                   "move that file away or choose another OUTPUT_DIR"),
    **{code: (None, "check the disk and the folder, then run again")
       for code in (errno.EIO, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT)},
}
# How Rust's io::Error ends its message (safetensors' SafetensorError has no errno of its own).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def url_scheme(text) -> str | None:
    """The scheme of a URL such as https://host/x or s3://bucket/x (lower case), which the project never reads
    or writes as a path: Path() would turn it into a local path with one slash lost."""
    found = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://", str(text))
    return found.group(1).lower() if found else None


def storage_errno(err: BaseException) -> int | None:
    """The errno of a failure of the file system behind `err`, or None: an OSError's own, or one that another
    library's error carries as its cause or context (torch's zip writer) or in its message (safetensors).
    An OSError without one of those errnos (a download's URLError, say) is not a failure of the disk."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = _RUST_OS_ERROR.search(str(err))
        code = err.errno if isinstance(err, OSError) else int(found.group(1)) if found else None
        if code in _FIXES or isinstance(err, OSError):
            return code if code in _FIXES else None
        err = err.__cause__ or err.__context__
    return None


def is_storage_error(err: BaseException) -> bool:
    """Whether `err` is a failure of the disk or the folder (storage_errno), which retrying cannot help."""
    return storage_errno(err) is not None


def write_error(path, err: BaseException) -> StorageError:
    """The StorageError for a write to `path` that failed with `err`, naming the file, problem and fix."""
    code = storage_errno(err) or getattr(err, "errno", None)
    problem, fix = _FIXES.get(code, (None, "check the disk and the folder, then run again"))
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) and on_read_only_mount(Path(path)):
        problem, fix = _READ_ONLY
    problem = problem or getattr(err, "strerror", None) or (os.strerror(code) if code else str(err))
    return StorageError(f"Could not write {path}: {problem} ({type(err).__name__}). The previous file, if "
                        f"any, is unchanged; {fix}.")


def on_read_only_mount(path: Path) -> bool:
    """Whether the nearest folder of `path` that exists lies on a file system mounted read-only."""
    for folder in (path, *path.parents):
        try:
            return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except FileNotFoundError:
            continue
        except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
            return False
    return False


@contextmanager
def storage_errors(path):
    """A failure of the disk or the folder inside the block, whichever library meets it, raised as the
    StorageError that names `path` and the fix; any other error passes as it is."""
    try:
        yield
    except MedQAError:
        raise
    except Exception as err:
        if not is_storage_error(err):
            raise
        raise write_error(path, err) from err


@contextmanager
def atomic_write(path, folder: bool = False):
    """Yield a temporary path beside `path`; when the block ends without error, flush it to disk and rename it
    over `path`. On any error the temporary file is removed and `path` keeps what it held; a failure of the
    disk or the folder is a StorageError (storage_errors).

    With `folder=True` the temporary path is a folder; the old folder is set aside until the new one is in
    place.
    """
    path = Path(path)
    tmp = None
    try:
        with storage_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            make = tempfile.mkdtemp if folder else tempfile.mkstemp
            made = make(dir=path.parent, prefix=TMP_PREFIX, suffix=f"-{path.name}")
            if not folder:
                os.close(made[0])
            tmp = Path(made if folder else made[1])
            yield tmp
            _settle(tmp)
            _replace(tmp, path)
            tmp = None
    finally:
        if tmp is not None:
            _remove(tmp)


def _replace(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path`; a folder cannot be renamed over another: the old one is set aside first."""
    if not (tmp.is_dir() and path.exists()):
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=TMP_PREFIX, suffix=f"-{path.name}.old"))
    os.replace(path, old / path.name)
    try:
        os.replace(tmp, path)
    except OSError:
        os.replace(old / path.name, path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def _settle(path: Path) -> None:
    """A temporary file or folder, and what a writer put into it, given the modes the user's umask gives and
    flushed to disk. tempfile (and save_pretrained's own temporary files) make them private (0600 / 0700),
    and renamed into place they would keep that mode, so that nobody else on a shared machine or Drive could
    read the run."""
    mask = _umask()
    for p in [path, *(sorted(path.rglob("*")) if path.is_dir() else [])]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o100
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _umask() -> int:
    """The process's umask: read from /proc where it is shown, so that no other thread sees it change."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_json_atomic(path, obj) -> None:
    """`obj` as JSON (UTF-8, indented) into `path`, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def save_figure(fig, path, dpi: int = 110) -> None:
    """A matplotlib figure written like every other file (the format from the name's extension, e.g. .png)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)


def save_torch_atomic(obj, path) -> None:
    """`torch.save(obj)` into `path`, atomically."""
    import torch

    # through a Python file, so that a failed write keeps its errno (torch's zip writer raises a RuntimeError
    # whose context is the file's OSError; given a path, it would say only "unexpected pos")
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def save_model_atomic(model, folder) -> Path:
    """`save_pretrained` into a fresh folder, then swap it in for the old one."""
    with atomic_write(folder, folder=True) as tmp:
        model.save_pretrained(tmp)
    return Path(folder)


def read_json(path, fix: str):
    """The JSON in `path`; a damaged file (empty, cut short, not JSON) raises UnreadableFile with `fix`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as err:
        raise UnreadableFile(path, f"Could not read {path}: "
                                   f"{err.strerror or err}", fix, damaged=False) from None
    else:
        if not text.strip():
            problem = "is empty"
        else:
            try:
                return json.loads(text)
            except json.JSONDecodeError as err:
                problem = f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    raise UnreadableFile(path, f"{path} {problem}", fix)


def update_json(path, change=None, /, **parts) -> dict:
    """Update the JSON object at `path` (created if missing) and write it back: `parts` replace the top-level
    keys they name, then `change(obj)`, if given, changes what lies deeper.

    The read, the update and the write hold a lock on the file's folder, so that two processes that record
    results at once (the notebook's kernel and `python -m medqa.judge`) both keep theirs, and a change deeper
    than the top level is made to what the file holds then, not to an earlier read of it."""
    path = Path(path)
    fix = "Delete it to start it afresh, or run again with OVERWRITE=True."
    with _folder_lock(path):
        obj = read_json(path, fix) if path.exists() else {}
        if not isinstance(obj, dict):
            raise MedQAError(f"{path} holds a JSON {type(obj).__name__}, not an object. {fix}")
        obj.update(parts)
        if change is not None:
            change(obj)
        write_json_atomic(path, obj)
    return obj


@contextmanager
def _folder_lock(path: Path, wait_s: float = 60):
    """An exclusive lock on the folder that holds `path`, for one short read-update-write: filelock's flock on
    the folder itself, so that it leaves no file behind and stays apart from the run folder's lock
    (run_folder.py). Where the file system (or Windows) cannot lock a folder, the update goes on unlocked."""
    import filelock
    import tenacity

    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        tenacity.Retrying(stop=tenacity.stop_after_delay(wait_s), wait=tenacity.wait_fixed(0.05),
                          retry=tenacity.retry_if_result(lambda locked: not locked))(
            filelock.lock_descriptor, fd, blocking=False)
    except tenacity.RetryError:
        os.close(fd)
        raise MedQAError(f"{path} could not be updated: another process kept its folder locked for "
                         f"{wait_s:.0f} s. Stop the other notebook or `python -m medqa.judge` that writes "
                         "there, and run again.") from None
    except OSError:  # a file system without flock
        pass
    try:
        yield
    finally:
        os.close(fd)


def zip_problem(path) -> str | None:
    """Why a zip-based file (a torch checkpoint, pytorch_model.bin) is unreadable, read from its directory
    only."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "is empty"
    try:
        with zipfile.ZipFile(path) as z:
            last = max((i.header_offset + i.compress_size for i in z.infolist()), default=0)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return f"is cut short or not a PyTorch file ({size:,} bytes, no readable zip directory at its end)"
    return None if last <= size else f"is cut short ({size:,} bytes, its directory names {last:,})"


def safetensors_problem(path) -> str | None:
    """Why a .safetensors file is unreadable, from its header and the file size that header implies."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size:
                raise ValueError
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        return f"is not a safetensors file or its header is damaged ({size:,} bytes)"
    expected = 8 + n + end
    return None if size >= expected else f"is cut short ({size:,} of {expected:,} bytes)"


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "rng", "state"}  # what train.py saves


def load_checkpoint(path):
    """`torch.load` of a training checkpoint, every tensor on the CPU whatever device trains
    (torch.set_rng_state takes only a CPU ByteTensor; load_state_dict copies weights and optimizer state to
    wherever the model is). A damaged checkpoint gives a MedQAError that says how to get past it."""
    import pickle

    import torch

    path = Path(path)
    fix = ("The run cannot continue from it: run again with OVERWRITE=True to start this run afresh (the "
           "damaged checkpoint is replaced), or set OUTPUT_DIR to another folder.")
    problem = zip_problem(path)
    if problem is None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(ckpt, dict) or not CHECKPOINT_KEYS <= set(ckpt):
                problem = "is not a checkpoint of this notebook (keys are missing)"
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
                AttributeError) as err:
            first_line = str(err).splitlines()[0][:120] if str(err) else ""
            problem = f"is damaged ({type(err).__name__}: {first_line})"
    if problem is not None:
        raise MedQAError(f"{path} {problem}. {fix}")
    return ckpt


def discard_run(out_dir, litter_only: bool = False) -> None:
    """Remove what an earlier run wrote (only on OVERWRITE=True), and the temporary files of writes that a
    killed kernel left (also with `litter_only`: they are never a file of the run)."""
    out_dir = Path(out_dir)
    with storage_errors(out_dir):
        names = [] if litter_only else [out_dir / name for name in RUN_FILES]
        for path in names + list(out_dir.glob(TMP_PREFIX + "*")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def fingerprint(source) -> str:
    """What identifies a data file or a model source, to notice when one changes under a run.

    A file: the SHA-256 of its bytes. A model folder: the SHA-256 of config.json and the weight files (names,
    sizes and contents), which is what `from_pretrained` reads: a model retrained to the same shape has the
    same names and sizes, so only the contents tell. Anything else is a hub id and stands for itself.
    """
    path = Path(source)
    if path.is_file():
        return "sha256:" + _sha256(path)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(path.iterdir()):
            if p.is_file() and (p.name == "config.json" or p.suffix in (".safetensors", ".bin")
                                or p.name.endswith(".index.json")):
                h.update(f"{p.name}\0{p.stat().st_size}\0{_sha256(p)}\n".encode())
        return "sha256:" + h.hexdigest()
    return f"hub:{source}"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
