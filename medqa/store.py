"""Writing results so that an interrupted or failed write leaves the old file or the new one, never half of
one, and reading them back with a clear error when a file is damaged.

Every file the project writes goes through `atomic_write`: a temporary file (or folder) beside the target,
flushed to disk and then renamed over it, removed on any error. Errors of the file system become a
`StorageError` that names the file, the problem ("no space left on device", ...) and the fix.
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

# Errors that come from the file system, not from the network or the caller's own checks.
_FS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
              errno.EISDIR, errno.EEXIST, errno.EIO, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT}
_FIXES = {
    errno.ENOSPC: ("no space left on device",
                   "free some space (or point OUTPUT_DIR elsewhere) and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space (or point OUTPUT_DIR elsewhere) and run again"),
    errno.EFBIG: ("file too large for this file system", "point OUTPUT_DIR at another disk"),
    errno.EACCES: ("permission denied", "make the folder writable (chmod u+w) or point OUTPUT_DIR elsewhere"),
    errno.EPERM: ("operation not permitted",
                  "make the folder writable (chmod u+w) or point OUTPUT_DIR elsewhere"),
    errno.EROFS: ("read-only file system", "point OUTPUT_DIR at a writable disk"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "point OUTPUT_DIR at a folder, not a file"),
    errno.EISDIR: ("a folder stands where the file should go",
                   "move that folder away or choose another OUTPUT_DIR"),
    errno.EEXIST: ("a file stands where a folder should go",
                   "move that file away or choose another OUTPUT_DIR"),
}


def url_scheme(text) -> str | None:
    """The scheme of a URL such as https://host/x or s3://bucket/x (lower case), which the project never reads
    or writes as a path: Path() would turn it into a local path with one slash lost."""
    found = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://", str(text))
    return found.group(1).lower() if found else None


def is_storage_error(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in _FS_ERRNOS


def write_error(path, err: OSError) -> StorageError:
    problem, fix = _FIXES.get(err.errno, (err.strerror or str(err), "check the disk and the folder, then "
                                                                    "run again"))
    return StorageError(f"Could not write {path}: {problem} ({type(err).__name__}). The previous file, if "
                        f"any, is unchanged; {fix}.")


@contextmanager
def atomic_write(path, folder: bool = False):
    """Yield a temporary path beside `path`; when the block ends without error, flush it to disk and rename it
    over `path`. On any error the temporary file is removed and `path` keeps what it held.

    With `folder=True` the temporary path is a folder; the old folder is set aside until the new one is in
    place.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=TMP_PREFIX, suffix=f"-{path.name}"))
        else:
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX, suffix=f"-{path.name}")
            os.close(fd)
            tmp = Path(name)
        yield tmp
        _give_umask_modes(tmp)
        _fsync(tmp)
        if folder and path.exists():  # a folder cannot be renamed over another: set the old one aside first
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=TMP_PREFIX, suffix=f"-{path.name}.old"))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / path.name, path)
                old.rmdir()
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        tmp = None
    except OSError as err:
        if is_storage_error(err):
            raise write_error(path, err) from err
        raise
    finally:
        if tmp is not None:
            _remove(tmp)


def _give_umask_modes(path: Path) -> None:
    """The modes the user's umask gives, for a temporary file or folder and what a writer put into it:
    tempfile (and save_pretrained's own temporary files) make them private (0600 / 0700), and renamed into
    place they would keep that mode, so that nobody else on a shared machine or Drive could read the run."""
    mask = _umask()
    for p in [path, *(sorted(path.rglob("*")) if path.is_dir() else [])]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o100
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)


def _umask() -> int:
    """The process's umask: read from /proc where it is shown, so that no other thread sees it change."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _fsync(path: Path) -> None:
    for p in (sorted(path.rglob("*")) if path.is_dir() else [path]):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def write_json_atomic(path, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def save_figure(fig, path, dpi: int = 110) -> None:
    """A matplotlib figure written like every other file (the format from the name's extension, e.g. .png)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)


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


def update_json(path, **parts) -> dict:
    """Merge `parts` into the JSON object at `path` (created if missing), at its top level.

    The read, merge and write hold a lock beside the file, so that two processes that record results at once
    (the notebook's kernel and `python -m medqa.judge`) both keep their parts."""
    return change_json(path, lambda obj: obj.update(parts))


def change_json(path, change) -> dict:
    """`change(obj)` on the JSON object at `path` (created if missing), written back; read, change and write
    under update_json's lock, so that a change deeper than the top level is made to what the file holds
    then, not to an earlier read of it."""
    path = Path(path)
    fix = "Delete it to start it afresh, or run again with OVERWRITE=True."
    with _merge_lock(path):
        obj = read_json(path, fix) if path.exists() else {}
        if not isinstance(obj, dict):
            raise MedQAError(f"{path} holds a JSON {type(obj).__name__}, not an object. {fix}")
        change(obj)
        write_json_atomic(path, obj)
    return obj


@contextmanager
def _merge_lock(path: Path, wait_s: float = 60):
    """An exclusive lock on the folder that holds `path`, for one short read-merge-write: a flock on the
    folder itself, so that it leaves no file behind, and apart from the run folder's lock (run_folder.py).
    Where the file system cannot lock, the merge goes on unlocked."""
    import time

    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError as err:
        raise (write_error(path, err) if is_storage_error(err) else err) from err
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MedQAError(f"{path} could not be updated: another process kept its folder locked "
                                     f"for {wait_s:.0f} s. Stop the other notebook or `python -m "
                                     f"medqa.judge` that writes there, and run again.") from None
                time.sleep(0.05)
            except OSError:  # a file system without flock
                break
        yield
    finally:
        os.close(fd)


def save_torch_atomic(obj, path) -> None:
    import torch

    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)  # through a Python file, so that a failed write keeps its errno
        except RuntimeError as err:
            # torch's zip writer reports the OSError as a RuntimeError
            if isinstance(err.__context__, OSError):
                raise err.__context__ from err
            raise


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


def save_model_atomic(model, folder) -> Path:
    """`save_pretrained` into a fresh folder, then swap it in for the old one."""
    with atomic_write(folder, folder=True) as tmp:
        model.save_pretrained(tmp)
    return Path(folder)


def discard_run(out_dir, litter_only: bool = False) -> None:
    """Remove what an earlier run wrote (only on OVERWRITE=True), and the temporary files of writes that a
    killed kernel left (also with `litter_only`: they are never a file of the run)."""
    out_dir = Path(out_dir)
    try:
        names = [] if litter_only else [out_dir / name for name in RUN_FILES]
        for path in names + list(out_dir.glob(TMP_PREFIX + "*")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    except OSError as err:
        if is_storage_error(err):
            raise write_error(out_dir, err) from err
        raise


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
