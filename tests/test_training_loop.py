"""The loop a learner reads: train_step holds the learning in one view, simple_loop gives train()'s losses; the
resume line names the epoch a checkpoint belongs to; SIGTERM stops training as Ctrl-C does, with a checkpoint that a
re-run continues from."""

import inspect
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from medqa import batches, model as gpt, train
from tests.test_training import setup  # noqa: F401 - a fixture

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


def test_the_step_the_notebook_shows_holds_forward_loss_backward_clipping_and_the_optimizer_step():
    source = inspect.getsource(train.train_step)
    for part in ("model(input_ids=", "F.cross_entropy(", "ignore_index=IGNORE", ".backward()", "clip_grad_norm_(",
                 "opt.step()", "scaler.step(opt)"):
        assert part in source, part
    assert len(source.splitlines()) <= 60


def test_the_simple_loop_gives_the_losses_train_gives(setup, tmp_path):  # noqa: F811
    s, train_set, val_loader, source = setup
    s = replace(s, DROPOUT=0.0, MAX_STEPS=6, EVAL_EVERY=2, OUTPUT_DIR=str(tmp_path))
    config = train.TrainingConfig.from_settings(s)
    loader = batches.make_loader(train_set, s.BATCH_SIZE, s.MAX_LENGTH, shuffle=True, seed=s.SEED)
    model = gpt.load_model(source, CPU, s.DROPOUT)
    plan = train.plan_run(model, s.BATCH_SIZE, s.MAX_LENGTH, s.PRECISION)
    history = train.train(model, loader, val_loader, config, tmp_path, log=lambda *_: None, plan=plan)
    simple_model = gpt.load_model(source, CPU, s.DROPOUT)
    simple = train.simple_loop(simple_model, loader, val_loader, config, plan)
    assert [(h["step"], h["train_loss"], h["val_loss"]) for h in history] == [
        (h["step"], h["train_loss"], h["val_loss"]) for h in simple]
    assert [h["step"] for h in simple] == [2, 4, 6]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), simple_model.parameters()))


def test_the_resume_line_names_the_epoch_the_checkpoint_belongs_to(setup, tmp_path):  # noqa: F811
    s, train_set, val_loader, source = setup
    s = replace(s, EPOCHS=1, DROPOUT=0.0, EVAL_EVERY=1000, OUTPUT_DIR=str(tmp_path))
    config = train.TrainingConfig.from_settings(s)
    train.train(gpt.load_model(source, CPU, 0.0), train_set, val_loader, config, tmp_path, log=lambda *_: None)
    lines = []
    train.train(gpt.load_model(source, CPU, 0.0), train_set, val_loader, config, tmp_path, log=lines.append)
    resumed = [line for line in lines if line.startswith("Resuming")]
    steps = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"]
    assert resumed == [f"Resuming from checkpoint.pt: step {steps} of {steps} (end of epoch 1)."]


CHILD = """
import sys
from pathlib import Path
import torch
from medqa import batches, model as gpt, settings, train
out, max_steps, marker = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
s = settings.resolve({"PROFILE": "smoke", "MAX_LENGTH": 64, "BATCH_SIZE": 2, "GRAD_ACCUM": 1, "EPOCHS": 1,
                      "EVAL_EVERY": 1000, "CHECKPOINT_EVERY": 1000, "MAX_STEPS": max_steps, "DROPOUT": 0.0}, env={})
g = torch.Generator().manual_seed(0)
import pandas as pd
frame = pd.DataFrame({"prompt_ids": [torch.randint(0, 50000, (6,), generator=g).tolist() for _ in range(400)],
                      "answer_ids": [torch.randint(0, 50000, (9,), generator=g).tolist() for _ in range(400)]})
data = batches.QADataset(frame, 64)
val = batches.make_loader(batches.QADataset(frame.head(2), 64), 2, 64, shuffle=False)
model = gpt.load_model(str(gpt.build_tiny_gpt2(out.parent / "tiny", seed=0)), torch.device("cpu"), 0.0)
steps = []


def count(*args):  # the third training forward under way: the parent may signal now
    steps.append(1)
    if len(steps) == 3:
        marker.write_text("3")


model.register_forward_hook(count)
train.train(model, data, val, train.TrainingConfig.from_settings(s), out, log=print)
print("finished")
"""


def test_sigterm_stops_training_as_ctrl_c_does_and_the_rerun_continues_from_its_checkpoint(tmp_path):
    script, out, marker = tmp_path / "child.py", tmp_path / "run", tmp_path / "three-steps"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(out), "200", str(marker)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=300)
    assert child.returncode != 0 and "finished" not in stdout
    step = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["step"]
    assert 3 <= step < 200
    assert f"Interrupted at step {step} of 200; the checkpoint holds it: run this cell again" in stderr, stderr[-2000:]
    rerun = subprocess.run([sys.executable, str(script), str(out), str(step + 2), str(tmp_path / "unused")], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming from checkpoint.pt: step {step} of 200 (epoch 1)." in rerun.stdout
    assert torch.load(out / "checkpoint.pt", weights_only=False)["state"]["step"] == step + 2


def test_the_sigterm_handler_before_training_is_back_after_it(setup, tmp_path):  # noqa: F811
    s, train_set, val_loader, source = setup
    s = replace(s, MAX_STEPS=1, OUTPUT_DIR=str(tmp_path))
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        train.train(gpt.load_model(source, CPU, 0.0), train_set, val_loader, train.TrainingConfig.from_settings(s),
                    tmp_path, log=lambda *_: None)
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
