"""The run's files: nothing is lost before a new run proved itself, damaged files are named with the way past
them, and a failed write (full disk, no permission) leaves the previous file and no temporary litter."""

import errno
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medqa import batches, data, errors, model as gpt, run_folder, settings, split, store, train
from medqa.errors import MedQAError, StorageError
from tests.sample_data import write_sample_csv
from tests.test_bad_input import snapshot

LOCK_FILES = (run_folder.LOCK_NAME, run_folder.HOLDER_NAME)  # the run folder's lock, held while a run uses it


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return gpt.build_tiny_gpt2(tmp_path_factory.mktemp("model") / "tiny-gpt2", seed=0)


def start_run(params, tiny_folder, tokenizer):
    """The notebook's cells up to the claim, in its order: every input check comes before OUTPUT_DIR is touched."""
    cfg = settings.resolve({"PROFILE": "smoke", "MODEL": str(tiny_folder), "MAX_LENGTH": 96, **params}, env={})
    path = data.locate_data(cfg.DATA_PATH)
    raw = data.read_table(path)
    clean, _ = data.clean(raw)
    df = data.sample_rows(clean, cfg.N_SAMPLES, cfg.SEED, log=lambda *_: None)
    data.check_enough(df, cfg.VAL_FRACTION, cfg.TEST_FRACTION)
    df = batches.encode_examples(df, tokenizer)
    splits = split.split_by_question(df, cfg.VAL_FRACTION, cfg.TEST_FRACTION, cfg.SEED)
    [batches.QADataset(d, cfg.MAX_LENGTH) for d in splits]
    source = str(tiny_folder)
    model = gpt.load_model(source, torch.device("cpu"), cfg.DROPOUT)
    gpt.check_max_length(cfg.MAX_LENGTH, model)
    return cfg, settings.claim_output_dir(cfg, data_file=path, model_source=source)


@pytest.fixture
def finished(tmp_path, monkeypatch):
    """A finished run in runs/smoke, claimed by the same flow."""
    monkeypatch.chdir(tmp_path)
    write_sample_csv(tmp_path / "data" / "medquad.csv")
    out = tmp_path / "runs" / "smoke"
    return out


def finish(out):
    (out / "metrics.json").write_text('{"history": [1, 2]}')
    (out / "model").mkdir()
    (out / "model" / "model.safetensors").write_bytes(b"weights")
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "state": {}}, out / "checkpoint.pt")


# ---------------------------------------------------------------- nothing is destroyed before the run proved itself

@pytest.mark.parametrize("bad", [dict(DATA_PATH="data/medquad.cvs"), dict(N_SAMPLES=3), dict(MAX_LENGTH=2048),
                                 dict(MAX_LENGTH=40), dict(SEED=-1), dict(LEARNING_RATE=float("inf"))])
def test_a_failed_check_with_overwrite_leaves_the_old_run_as_it_was(finished, tiny_folder, tokenizer, bad):
    start_run({}, tiny_folder, tokenizer)
    finish(finished)
    before = snapshot(finished.parent)
    with pytest.raises(MedQAError):
        start_run({**bad, "OVERWRITE": True, "SEED": 7} if "SEED" not in bad else {**bad, "OVERWRITE": True},
                  tiny_folder, tokenizer)
    assert snapshot(finished.parent) == before


def test_a_failed_check_records_nothing_so_its_fix_is_not_refused(finished, tiny_folder, tokenizer):
    with pytest.raises(MedQAError):
        start_run({"DATA_PATH": "data/medquad.cvs"}, tiny_folder, tokenizer)
    assert not finished.exists()
    cfg, out = start_run({"DATA_PATH": "data/medquad.csv"}, tiny_folder, tokenizer)  # the fix: accepted
    assert json.loads((out / "run.json").read_text())["DATA_PATH"] == "data/medquad.csv"


def test_changed_data_or_model_under_a_run_is_named(finished, tiny_folder, tokenizer, tmp_path):
    start_run({}, tiny_folder, tokenizer)
    finish(finished)
    recorded = json.loads((finished / "run.json").read_text())
    assert recorded["DATA_FINGERPRINT"].startswith("sha256:") and recorded["MODEL_FINGERPRINT"].startswith("sha256:")
    start_run({}, tiny_folder, tokenizer)  # the same data and model: resumes without a word

    csv_path = finished.parent.parent / "data" / "medquad.csv"
    original = csv_path.read_bytes()
    write_sample_csv(csv_path, seed=1)
    before = snapshot(finished)
    with pytest.raises(MedQAError, match="the data file changed since that run began.*OVERWRITE=True") as err:
        start_run({}, tiny_folder, tokenizer)
    assert "DATA_PATH: 'data/medquad.csv'" in str(err.value)  # the setting and the file that changed
    assert snapshot(finished) == before
    csv_path.write_bytes(original)

    other = gpt.build_tiny_gpt2(tmp_path / "other-tiny", seed=1)  # same shape, other weights
    with pytest.raises(MedQAError, match=rf"the model \(MODEL's weights\) changed.*MODEL: {str(other)!r}"):
        settings.claim_output_dir(settings.resolve({"PROFILE": "smoke", "MODEL": str(tiny_folder), "MAX_LENGTH": 96},
                                                   env={}), data_file=csv_path, model_source=other)
    assert snapshot(finished) == before

    _, out = start_run({"OVERWRITE": True}, tiny_folder, tokenizer)  # unchanged inputs: still the same run
    assert (out / "metrics.json").exists()
    write_sample_csv(csv_path, seed=1)
    _, out = start_run({"OVERWRITE": True}, tiny_folder, tokenizer)  # OVERWRITE replaces the run on new data
    assert not (out / "metrics.json").exists() and not (out / "model").exists()
    assert json.loads((out / "run.json").read_text())["DATA_FINGERPRINT"] != recorded["DATA_FINGERPRINT"]


def test_model_fingerprint_of_a_hub_id_and_a_folder(tiny_folder, tmp_path):
    assert store.fingerprint("openai-community/gpt2") == "hub:openai-community/gpt2"
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((tiny_folder / name).read_bytes())
    (copy / "README.md").write_text("notes do not change the model")
    assert store.fingerprint(copy) == store.fingerprint(tiny_folder)


# ---------------------------------------------------------------- damaged run files

def claim(out, **overrides):
    s = settings.resolve({"PROFILE": "smoke", "OUTPUT_DIR": str(out), **overrides}, env={})
    return settings.claim_output_dir(s)


@pytest.mark.parametrize("name,content,words", [
    ("run.json", b"", "run.json is empty"),
    ("run.json", b'{"MODEL": "tiny", ', "run.json is not valid JSON"),
    ("run.json", b"[1, 2]", "run.json holds no JSON object"),
    ("metrics.json", b"", "metrics.json is empty"),
    ("metrics.json", b"\x00\x00", "metrics.json is not valid JSON"),
    ("checkpoint.pt", b"", "checkpoint.pt (it is empty)"),
    ("checkpoint.pt", None, "checkpoint.pt (it is cut short"),
])
def test_damaged_run_files_are_named_and_overwrite_gets_past_them(tmp_path, name, content, words):
    out = claim(tmp_path / "run")
    finish(out)
    if content is None:
        raw = (out / name).read_bytes()
        content = raw[: len(raw) // 2]
    (out / name).write_bytes(content)
    before = snapshot(out)
    with pytest.raises(MedQAError) as err:
        claim(out)
    for w in (words, "OVERWRITE=True", "OUTPUT_DIR"):
        assert w in str(err.value)
    assert snapshot(out) == before
    claim(out, OVERWRITE=True)
    assert sorted(p.name for p in out.iterdir() if p.name not in LOCK_FILES) == ["run.json"]


def test_temporary_files_of_a_killed_write_are_cleared_when_the_run_continues(tmp_path):
    out = claim(tmp_path / "run")
    finish(out)
    (out / f"{store.TMP_PREFIX}x1-checkpoint.pt").write_bytes(b"half")  # a write the kernel's death cut short
    (out / f"{store.TMP_PREFIX}x2-model").mkdir()
    claim(out)
    assert sorted(p.name for p in out.iterdir() if p.name not in LOCK_FILES) == ["checkpoint.pt", "metrics.json",
                                                                                  "model", "run.json"]


def test_files_of_a_run_without_run_json_are_not_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    finish(out)
    with pytest.raises(MedQAError, match=r"without run.json \(checkpoint.pt, metrics.json, model\)"):
        claim(out)


@pytest.fixture(scope="module")
def small_training(tmp_path_factory, tokenizer, tiny_folder):
    root = tmp_path_factory.mktemp("train")
    df, _ = data.clean(data.read_table(write_sample_csv(root / "m.csv")))
    df = batches.encode_examples(data.sample_rows(df, 60, 0), tokenizer)
    tr, va, _ = split.split_by_question(df, 0.1, 0.1, 0)
    s = settings.resolve({"PROFILE": "smoke", "MAX_LENGTH": 96, "BATCH_SIZE": 4, "EPOCHS": 1, "EVAL_EVERY": 50,
                          "EVAL_BATCHES": 1, "MAX_STEPS": 2}, env={})
    val = batches.make_loader(batches.QADataset(va, 96), 4, 96, shuffle=False)
    return s, batches.QADataset(tr, 96), val


def test_a_checkpoint_damaged_inside_stops_training_with_the_fix_and_overwrite_starts_afresh(small_training,
                                                                                              tiny_folder, tmp_path):
    s, train_set, val_loader = small_training
    model = gpt.load_model(str(tiny_folder), torch.device("cpu"))
    torch.save({"not": "a checkpoint"}, tmp_path / "checkpoint.pt")  # a whole zip, with the wrong contents
    with pytest.raises(MedQAError, match="checkpoint.pt is not a checkpoint.*OVERWRITE=True"):
        train.train(model, train_set, val_loader, train.TrainingConfig.from_settings(s), tmp_path, log=lambda *_: None)
    notes = []
    train.train(model, train_set, val_loader, train.TrainingConfig.from_settings(replace(s, OVERWRITE=True)), tmp_path, log=notes.append)
    assert any("starts afresh" in note for note in notes)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 2


def test_update_json_names_a_damaged_metrics_file(tmp_path):
    (tmp_path / "metrics.json").write_text("")
    with pytest.raises(MedQAError, match="metrics.json is empty.*OVERWRITE=True"):
        store.update_json(tmp_path / "metrics.json", history=[])
    assert (tmp_path / "metrics.json").read_text() == ""


# ---------------------------------------------------------------- failed writes: full disk, no permission

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_keeps_the_old_json_and_leaves_no_litter(tmp_path, monkeypatch):
    store.write_json_atomic(tmp_path / "metrics.json", {"good": 1})
    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(StorageError, match=r"metrics.json: no space left on device.*free some space"):
        store.update_json(tmp_path / "metrics.json", more=2)
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch):
    store.save_torch_atomic({"step": 1}, tmp_path / "checkpoint.pt")
    real_open = open

    class FillsUp:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, b):
            self.written += len(b)
            if self.written > 100:
                no_space()
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(store, "open", lambda *a, **k: FillsUp(real_open(*a, **k)), raising=False)
    with pytest.raises(StorageError, match="checkpoint.pt: no space left on device"):
        store.save_torch_atomic({"step": 2, "w": torch.zeros(1000)}, tmp_path / "checkpoint.pt")
    monkeypatch.undo()
    assert torch.load(tmp_path / "checkpoint.pt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_failed_model_save_keeps_the_old_model(tmp_path, tiny_folder):
    model = gpt.load_model(str(tiny_folder), torch.device("cpu"))
    store.save_model_atomic(model, tmp_path / "model")
    before = snapshot(tmp_path)

    class Full:
        def save_pretrained(self, folder):
            (Path(folder) / "config.json").write_text("{}")
            no_space()

    with pytest.raises(StorageError, match="model: no space left on device"):
        store.save_model_atomic(Full(), tmp_path / "model")
    assert snapshot(tmp_path) == before
    store.save_model_atomic(model, tmp_path / "model")  # and a good save still replaces it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_read_only_output_dir_names_the_file_and_the_fix(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):  # root writes anyway: show the same failure by injecting what the OS says
            monkeypatch.setattr(store.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(
                PermissionError(errno.EACCES, "Permission denied", kw["dir"])))
        # the lock file is the first file a claim makes
        with pytest.raises(StorageError, match=r"(run.json|\.medqa-run\.lock): permission denied.*chmod u\+w"):
            settings.claim_output_dir(replace(settings.resolve({"PROFILE": "smoke"}, env={}), OUTPUT_DIR=str(out)))
    finally:
        out.chmod(0o700)
    assert list(out.iterdir()) == []


def test_a_download_onto_a_full_disk_is_not_retried_and_leaves_nothing(tmp_path, monkeypatch):
    import shutil

    calls = []

    def full(*args):
        calls.append(1)
        no_space()

    monkeypatch.setattr(shutil, "copyfileobj", full)
    (tmp_path / "srv.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(StorageError, match="medquad.csv: no space left on device"):
        data.download_url((tmp_path / "srv.csv").as_uri(), tmp_path / "d" / "medquad.csv", retries=3, backoff=0)
    assert len(calls) == 1 and list((tmp_path / "d").iterdir()) == []


def test_a_storage_error_is_not_retried():
    calls = []

    def action():
        calls.append(1)
        raise StorageError("disk full")

    with pytest.raises(StorageError):
        errors.retry(action, tries=3, backoff=0, give_up_on=(StorageError,))
    assert calls == [1]


# ---------------------------------------------------------------- one run per folder

HOLDER = """
import sys
from medqa import run_folder
run_folder.claim(sys.argv[1], {"SEED": int(sys.argv[2])}, overwrite=sys.argv[3] == "1")
print("claimed", flush=True)
sys.stdin.read()  # holds the folder until the test closes stdin or kills it
"""


def other_process(out, seed=1, overwrite=False):
    """Another process (a second kernel) that claims `out` and holds it; it says "claimed" once it does."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seed), "1" if overwrite else "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout.readline().strip() == "claimed", proc.stderr.read()
    return proc


def test_a_second_run_in_a_held_folder_is_refused_naming_the_holder_even_with_overwrite(tmp_path):
    import socket

    out = tmp_path / "run"
    holder = other_process(out)
    try:
        finish(out)  # the first run's files, while it trains
        before = snapshot(out)
        for overwrite in (False, True):
            with pytest.raises(MedQAError, match="in use by another run") as err:
                run_folder.claim(out, {"SEED": 2}, overwrite=overwrite)
            assert f"process {holder.pid} on {socket.gethostname()}" in str(err.value)
            assert "another folder" in str(err.value)
            assert snapshot(out) == before  # OVERWRITE deleted nothing of the run that holds the folder
        with pytest.raises(MedQAError, match="in use by another run"):  # the same settings: no resume either
            run_folder.claim(out, {"SEED": 1}, overwrite=False)
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_leaves_no_lock_that_blocks(tmp_path):
    out = tmp_path / "run"
    holder = other_process(out)
    holder.kill()  # SIGKILL: no clean-up ran, the lock file and its holder record stay
    holder.wait()
    assert (out / run_folder.LOCK_NAME).exists()
    run_folder.claim(out, {"SEED": 1}, overwrite=False)  # resumes the killed run at once
    run_folder.release(out)


def test_two_runs_started_together_one_wins(tmp_path):
    out = tmp_path / "run"
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "1", "0"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent) for _ in range(2)]
    try:
        lines = [p.stdout.readline().strip() for p in procs]
        assert sorted(lines) == ["", "claimed"]
        loser = procs[lines.index("")]
        loser.wait(timeout=60)
        assert loser.returncode != 0 and "in use by another run" in loser.stderr.read()
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_the_claim_cell_runs_again_in_the_same_kernel_and_frees_the_folder_it_left(tmp_path):
    out, other = tmp_path / "run", tmp_path / "other"
    run_folder.claim(out, {"SEED": 1}, overwrite=False)
    run_folder.claim(out, {"SEED": 1}, overwrite=False)  # the cell again: same process, same folder
    run_folder.claim(out, {"SEED": 2}, overwrite=True)
    run_folder.claim(other, {"SEED": 1}, overwrite=False)  # this kernel moved on to another folder
    holder = other_process(out, seed=2)  # so another process may take the first one
    holder.kill()
    holder.wait()
    run_folder.release(other)


def test_the_judge_may_record_into_a_held_folder_and_merges_never_lose_a_part(tmp_path):
    """A kernel holds the folder for as long as it lives; `python -m medqa.judge` (another process) still adds
    its part to metrics.json, and two merges at once both keep theirs."""
    import fcntl
    import os
    import threading

    out = tmp_path / "run"
    holder = other_process(out)
    try:
        store.update_json(out / "metrics.json", judge={"mean": 3})  # allowed while another run holds the folder
        fd = os.open(out, os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # another merge under way
        done = threading.Event()
        thread = threading.Thread(target=lambda: (store.update_json(out / "metrics.json", history=[1]),
                                                  done.set()))
        thread.start()
        assert not done.wait(0.5)  # it waits for the other merge instead of reading the file under it
        os.close(fd)
        thread.join(timeout=30)
        assert json.loads((out / "metrics.json").read_text()) == {"judge": {"mean": 3}, "history": [1]}
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- files get the modes the umask gives

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_and_the_model_folder_get_the_umasks_modes(tmp_path, tiny_folder, umask):
    import stat

    old = os.umask(umask)
    try:
        store.write_json_atomic(tmp_path / "metrics.json", {"a": 1})
        store.update_json(tmp_path / "metrics.json", b=2)
        store.save_torch_atomic({"step": 1}, tmp_path / "checkpoint.pt")
        store.save_model_atomic(gpt.load_model(str(tiny_folder), torch.device("cpu")), tmp_path / "model")
        run_folder.claim(tmp_path / "run", {"SEED": 1}, overwrite=False)
        run_folder.release(tmp_path / "run")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    for path in (tmp_path / "metrics.json", tmp_path / "checkpoint.pt", tmp_path / "model" / "config.json",
                 tmp_path / "model" / "model.safetensors", tmp_path / "run" / "run.json",
                 tmp_path / "run" / run_folder.HOLDER_NAME):
        assert mode(path) == 0o666 & ~umask, path
    for path in (tmp_path / "model", tmp_path / "run"):
        assert mode(path) == 0o777 & ~umask, path


def test_an_unreadable_json_carries_its_parts(tmp_path):
    from medqa.errors import UnreadableFile

    path = tmp_path / "metrics.json"
    path.write_text('{"a": ')
    with pytest.raises(UnreadableFile) as err:
        store.read_json(path, "Fix: delete it.")
    assert err.value.path == path and err.value.fix == "Fix: delete it."
    assert err.value.problem == f"{path} is not valid JSON (Expecting value at line 1, column 7)"
    assert str(err.value) == f"{err.value.problem}: it was damaged (e.g. by a full disk or an editor). Fix: delete it."
    assert isinstance(err.value, MedQAError)


def test_a_folder_deleted_while_held_is_locked_again_when_claimed_again(tmp_path):
    """The user deletes OUTPUT_DIR (to start afresh) while the kernel that ran there lives: the lock it held
    went with the folder, so claiming the folder again takes a new one, and a second process is refused."""
    import shutil
    import subprocess
    import sys

    out = tmp_path / "run"
    run_folder.claim(out, {"SEED": 1}, overwrite=False)
    try:
        shutil.rmtree(out)
        run_folder.claim(out, {"SEED": 1}, overwrite=False)
        assert (out / run_folder.LOCK_NAME).exists()
        other = subprocess.run([sys.executable, "-c", HOLDER, str(out), "1", "0"], input="", text=True,
                               capture_output=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
        assert other.returncode != 0 and "in use by another run" in other.stderr, other.stdout
    finally:
        run_folder.release(out)


# ---------------------------------------------------------------- a library's write that fails

def test_a_full_disk_in_safetensors_is_the_projects_error_and_keeps_the_old_model(tmp_path, tiny_folder,
                                                                                monkeypatch):
    """safetensors reports a full disk as SafetensorError("... No space left on device (os error 28)"), with no
    errno: it ends as the project's message, naming the folder and the fix, and leaves the old folder."""
    import safetensors
    import transformers.modeling_utils

    model = gpt.load_model(str(tiny_folder), torch.device("cpu"))
    store.save_model_atomic(model, tmp_path / "model")
    before = snapshot(tmp_path)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # what it wrote before the disk filled
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                          "error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    with pytest.raises(StorageError, match=r"model: no space left on device \(SafetensorError\).*free some space"):
        store.save_model_atomic(model, tmp_path / "model")
    assert snapshot(tmp_path) == before


LIMITED_WRITES = r"""
import json, resource, sys
from pathlib import Path
import torch
from medqa import gpt2_tokenizer, model as gpt, store
from medqa.errors import MedQAError

out = Path(sys.argv[1])
tiny = gpt.load_model(sys.argv[2], torch.device("cpu"))
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.plot(range(1000), [i % 7 for i in range(1000)])
writes = {
    "safetensors (save_pretrained)": lambda: store.save_model_atomic(tiny, out / "model"),
    "the tokenizer's save_pretrained": lambda: store.save_model_atomic(gpt2_tokenizer.for_transformers(), out / "model"),
    "torch.save": lambda: store.save_torch_atomic({"w": torch.zeros(100_000)}, out / "checkpoint.pt"),
    "matplotlib's savefig": lambda: store.save_figure(fig, out / "loss.png"),
    "json": lambda: store.write_json_atomic(out / "metrics.json", {"history": list(range(100_000))}),
}
for what, write in writes.items():
    write()  # the previous file of each
said = {}
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # Python ignores SIGXFSZ: EFBIG
for what, write in writes.items():
    try:
        write()
        said[what] = "written"
    except MedQAError as err:
        said[what] = str(err)
    except Exception as err:
        said[what] = f"raw {type(err).__name__}: {err}"
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print(json.dumps(said))
"""


def test_every_library_that_writes_ends_in_the_projects_error_on_a_real_failure(tmp_path, tiny_folder):
    """A file-size limit (RLIMIT_FSIZE) makes each library's own write fail as a full disk does, with the error
    that library really raises; each ends in the project's message, and the files before stay whole."""
    import subprocess
    import sys

    pytest.importorskip("resource")
    done = subprocess.run([sys.executable, "-c", LIMITED_WRITES, str(tmp_path / "run"), str(tiny_folder)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    said = json.loads(done.stdout.strip().splitlines()[-1])
    for what, message in said.items():
        assert message.startswith("Could not write ") and "file too large" in message, (what, message)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "loss.png", "metrics.json",
                                                                    "model"]
    assert len(json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]) == 100_000
    assert torch.load(tmp_path / "run" / "checkpoint.pt")["w"].shape == (100_000,)


def test_a_read_only_mount_is_told_to_choose_another_output_dir(tmp_path, monkeypatch):
    """A read-only mount (a FUSE drive, say) can answer EACCES as a folder without write permission does; the
    file system's read-only flag tells them apart, and chmod cannot help there."""
    out = tmp_path / "run"
    out.mkdir()
    real_statvfs = os.statvfs

    class ReadOnly:
        def __init__(self, path):
            self.f_flag = real_statvfs(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(store.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", kw["dir"])))
    monkeypatch.setattr(store.os, "statvfs", ReadOnly)
    with pytest.raises(StorageError, match="metrics.json: read-only file system.*choose another OUTPUT_DIR") as err:
        store.write_json_atomic(out / "metrics.json", {"a": 1})
    assert "chmod u+w" not in str(err.value)
    assert list(out.iterdir()) == []


def test_a_real_read_only_mount_is_told_to_choose_another_output_dir(tmp_path):
    """Where this process may mount (root with CAP_SYS_ADMIN), a tmpfs remounted read-only: the claim and a
    write both say to choose another OUTPUT_DIR, and neither suggests chmod."""
    import subprocess

    mount = tmp_path / "mount"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this process cannot mount a file system")
    try:
        (mount / "run").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        for write in (lambda: run_folder.claim(mount / "run", {"SEED": 1}, overwrite=False),
                      lambda: store.update_json(mount / "run" / "metrics.json", a=1)):
            with pytest.raises(StorageError, match="read-only file system.*choose another OUTPUT_DIR") as err:
                write()
            assert "chmod u+w" not in str(err.value)
    finally:
        run_folder.release(mount / "run")
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_downloads_own_error_is_not_taken_for_a_failure_of_the_disk(tmp_path):
    """urllib's URLError is an OSError that holds a FileNotFoundError: it stays a download's error, retried and
    reported as such, while a library's error that holds a full disk is one."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.URLError) as err:
        urllib.request.urlopen((tmp_path / "missing.csv").as_uri())
    assert store.storage_errno(err.value) is None
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as wrapped:
        assert store.storage_errno(wrapped) == errno.ENOSPC


def test_a_failed_write_removes_its_temporary_link_too(tmp_path):
    # a writer may put a link to a folder where its temporary file was; the failed write leaves neither
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(RuntimeError):
        with store.atomic_write(tmp_path / "out.json") as tmp:
            tmp.unlink()
            tmp.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
            raise RuntimeError("writer failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]
