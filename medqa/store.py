"""Writing results so that a failed write leaves the old file or the new one, never half of one, and reading
them back with a clear error when a file is damaged. A failure of the disk or the folder, whichever library
meets it, becomes a `StorageError` that names the file, the problem and the fix."""

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
_FREE = "free some space (or point OUTPUT_DIR elsewhere) and run again"
_CHECK = "check the disk and the folder, then run again"
# Failures of the file system, as (problem, fix). Only these become a StorageError: other OSErrors (a network
# error inside a download, say) stay what they are, for the caller to retry or report.
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
    **{code: (None, _CHECK) for code in (errno.EIO, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT)},
}
# How Rust's io::Error ends its message (safetensors' SafetensorError has no errno of its own).
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def url_scheme(text) -> str | None:
    """The scheme (lower case) of a URL such as https://host/x, which the project never takes for a path."""
    found = re.match(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://", str(text))
    return found.group(1).lower() if found else None


def storage_errno(err: BaseException) -> int | None:
    """The errno of a failure of the file system behind `err` (its own, or its cause's or context's, or named
    in its message as safetensors does), or None; an OSError with another errno is not one."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = _RUST_OS_ERROR.search(str(err))
        code = err.errno if isinstance(err, OSError) else int(found.group(1)) if found else None
        if code in _FIXES or isinstance(err, OSError):
            return code if code in _FIXES else None
        err = err.__cause__ or err.__context__
    return None


def write_error(path, err: BaseException) -> StorageError:
    """The StorageError for a write to `path` that failed with `err`, naming the file, problem and fix."""
    code = storage_errno(err) or getattr(err, "errno", None)
    problem, fix = _FIXES.get(code, (None, _CHECK))
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
    """A failure of the disk or the folder inside the block raised as the StorageError for `path`."""
    try:
        yield
    except MedQAError:
        raise
    except Exception as err:
        if storage_errno(err) is None:
            raise
        raise write_error(path, err) from err


@contextmanager
def atomic_write(path, folder: bool = False):
    """Yield a temporary path (a folder with `folder`) beside `path`, flushed to disk and renamed over it when
    the block ends without error; on any error it is removed and `path` keeps what it held."""
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
            _put_in_place(tmp, path)
            tmp = None
    finally:
        if tmp is not None and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            tmp.unlink(missing_ok=True)


def _put_in_place(tmp: Path, path: Path) -> None:
    """Give `tmp`, and all in it, the modes the umask gives (tempfile makes them private, 0600 / 0700), flush
    it to disk and rename it over `path` (a folder cannot be renamed over another: the old is set aside)."""
    mask = _umask()
    for p in [tmp, *(sorted(tmp.rglob("*")) if tmp.is_dir() else [])]:
        if p.is_symlink():
            continue
        executable = p.is_dir() or p.stat().st_mode & 0o100
        os.chmod(p, (0o777 if executable else 0o666) & ~mask)
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
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


def _umask() -> int:
    """The process's umask: read from /proc where it is shown, so that no other thread sees it change."""
    try:
        return int(re.search(r"^Umask:\s*(\d+)", Path("/proc/self/status").read_text(), re.M).group(1), 8)
    except (OSError, AttributeError, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_json_atomic(path, obj) -> None:
    """`obj` as JSON (UTF-8, indented) into `path`, atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def save_figure(fig, path, dpi: int = 110) -> None:
    """A matplotlib figure into `path`, atomically, in the format its extension names (e.g. .png)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi)


def save_torch_atomic(obj, path) -> None:
    """`torch.save(obj)` into `path`, atomically."""
    import torch

    # through a Python file, so that a failed write keeps its errno (given a path, torch's zip writer would
    # say only "unexpected pos")
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
        problem = None if text.strip() else "is empty"
    except UnicodeDecodeError:
        problem = "is not UTF-8 text"
    except OSError as err:
        problem = f"Could not read {path}: {err.strerror or err}"
        raise UnreadableFile(path, problem, fix, damaged=False) from None
    if problem is None:
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            problem = f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    raise UnreadableFile(path, f"{path} {problem}", fix)


def update_json(path, change=None, /, **parts) -> dict:
    """Update the JSON object at `path` (made if missing): `parts` replace top-level keys, then `change(obj)`,
    under a lock, so that two processes recording at once (notebook, `medqa.judge`) both keep theirs."""
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
    """flock on the folder that holds `path`: no file left behind, apart from the run folder's lock. Where the
    folder cannot be locked, the update goes on unlocked."""
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
    """Why a zip-based file (a torch checkpoint, pytorch_model.bin) is unreadable, from its directory."""
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


def load_checkpoint(path):
    """`torch.load` of a training checkpoint onto the CPU (torch.set_rng_state takes only a CPU tensor); a
    damaged one gives a MedQAError that says how to get past it."""
    import pickle

    import torch

    path = Path(path)
    fix = ("The run cannot continue from it: run again with OVERWRITE=True to start this run afresh (the "
           "damaged checkpoint is replaced), or set OUTPUT_DIR to another folder.")
    problem = zip_problem(path)
    if problem is None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            keys = {"model", "optimizer", "scheduler", "rng", "state"}  # what save_checkpoint saves
            if not isinstance(ckpt, dict) or not keys <= set(ckpt):
                problem = "is not a checkpoint of this notebook (keys are missing)"
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
                AttributeError) as err:
            first_line = str(err).splitlines()[0][:120] if str(err) else ""
            problem = f"is damaged ({type(err).__name__}: {first_line})"
    if problem is not None:
        raise MedQAError(f"{path} {problem}. {fix}")
    return ckpt


def discard_run(out_dir, litter_only: bool = False) -> None:
    """Remove what an earlier run wrote, and the temporary files of killed writes (alone: `litter_only`)."""
    out_dir = Path(out_dir)
    with storage_errors(out_dir):
        names = [] if litter_only else [out_dir / name for name in RUN_FILES]
        for path in names + list(out_dir.glob(TMP_PREFIX + "*")):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def fingerprint(source) -> str:
    """What identifies a data file (the SHA-256 of its bytes), a model folder (of the names, sizes and
    contents of what `from_pretrained` reads) or a hub id (itself), to notice when one changes under a run."""
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
