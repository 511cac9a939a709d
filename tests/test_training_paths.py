"""Training as a GPU or a Mac runs it, checked on the CPU: weights in fp32 whatever the folder holds,
copies to the device that are safe everywhere, validation in the plan's micro-batches, answers between
epochs that leave training's randomness alone, an interrupt that writes a checkpoint the re-run continues
exactly, MAX_STEPS that never goes past EPOCHS, a finished run continued for more epochs, and a disk too
small found before training."""

import os
import signal
from collections import namedtuple
from dataclasses import replace

import pandas as pd
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers import GPT2LMHeadModel

from medqa import batches, disk, evaluate, generate, hardware, model as gpt, settings, train, training_run
from medqa.hardware import Plan
from medqa.errors import MedQAError
from tests import fp32

CPU = torch.device("cpu")


def watch_forward(mp, watch):
    """GPT-2's forward calls `watch(model, input_ids)` first: every pass, training or not, goes through it."""
    real = GPT2LMHeadModel.forward
    mp.setattr(GPT2LMHeadModel, "forward", lambda model, *a, **k: watch(model, k["input_ids"]) or real(model, *a, **k))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """20 made-up examples of at most 40 tokens: 5 steps an epoch in batches of 4; dropout on."""
    root = tmp_path_factory.mktemp("paths")
    g = torch.Generator().manual_seed(7)
    frame = pd.DataFrame({"prompt_ids": [torch.randint(0, 50000, (5 + i % 7,), generator=g).tolist()
                                         for i in range(20)],
                          "answer_ids": [torch.randint(0, 50000, (3 + i % 11,), generator=g).tolist()
                                         for i in range(20)]})
    data = batches.QADataset(frame, 64)
    val = batches.make_loader(batches.QADataset(frame.head(6), 64), 4, 64, shuffle=False)
    s = settings.resolve({"PROFILE": "smoke", "BATCH_SIZE": 4, "MAX_LENGTH": 64, "EPOCHS": 2, "EVAL_EVERY": 2,
                          "CHECKPOINT_EVERY": 3, "WARMUP_STEPS": 2, "DROPOUT": 0.1, "OUTPUT_DIR": str(root)},
                         env={})
    return s, data, val, str(gpt.build_tiny_gpt2(root / "tiny", seed=0))


def run(small, out, on_epoch_end=None, **overrides):
    s, data, val, source = small
    s = replace(s, **overrides)
    model = gpt.load_model(source, CPU, s.DROPOUT)
    history = train.train(model, data, val, train.TrainingConfig.from_settings(s), out,
                          on_epoch_end=on_epoch_end, log=lambda *_: None)
    return model, history


def assert_same(a, b):
    (ma, ha), (mb, hb) = a, b
    # the same kernels on the same numbers in the same order, on one machine: the same bits. (A tolerance would
    # not do: AdamW turns a rounding difference in a gradient near zero into a whole step of its weight.)
    assert [(h["step"], h["train_loss"], h["val_loss"]) for h in ha] == [
        (h["step"], h["train_loss"], h["val_loss"]) for h in hb]
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name


@pytest.fixture(scope="module")
def uninterrupted(small, tmp_path_factory):
    return run(small, tmp_path_factory.mktemp("whole"))


# ---------------------------------------------------------------- precision and copies

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_folder_loads_as_fp32_master_weights(tiny_model, tmp_path, dtype):
    tiny_model.to(dtype).save_pretrained(tmp_path)
    tiny_model.float()
    # the world as it is: transformers 5 alone keeps the file's precision (dtype="auto")
    assert next(GPT2LMHeadModel.from_pretrained(tmp_path).parameters()).dtype == dtype
    model = gpt.load_model(str(tmp_path), CPU)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_no_copy_to_the_device_is_asynchronous_from_unpinned_memory(tiny_model, monkeypatch):
    from tests.test_hardware import batch_of, fresh

    asked = []
    real = torch.Tensor.to

    def to(self, *args, **kwargs):
        asked.append(kwargs.get("non_blocking", False))
        return real(self, *args, **kwargs)

    model = fresh(tiny_model)
    monkeypatch.setattr(torch.Tensor, "to", to)
    train.train_step(model, train.make_optimizer(model, 1e-3, 0.1), [batch_of(4)], Plan("fp32", micro_batch=2))
    train.mean_loss(model, [batch_of(4)], Plan("fp32", micro_batch=2))
    assert asked and not any(asked)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: non_blocking)
    assert not hardware.to_device(torch.ones(2), torch.device("mps"))  # MPS: never asynchronous
    assert not hardware.to_device(torch.ones(2), torch.device("cuda"))  # not pinned


@pytest.mark.numerics
def test_validation_and_reference_perplexity_run_in_the_plans_micro_batches(small, tmp_path, monkeypatch):
    s, data, val, source = small
    model = gpt.load_model(source, CPU, 0.0)
    whole = train.mean_loss(model, val, Plan("fp32"))
    rows = []
    watch_forward(monkeypatch, lambda m, ids: rows.append((m.training, len(ids))))
    # a mean over the sample's targets of log-sum-exps over the vocabulary, summed in another order: float32
    # allows sum_bound(targets * vocab) each way; the perplexity's loss is also recorded to 4 decimals
    targets = sum(int((b["labels"] != batches.IGNORE).sum()) for b in val)
    bound = 2 * fp32.sum_bound(targets * model.config.vocab_size)
    assert train.mean_loss(model, val, Plan("fp32", micro_batch=1)) == pytest.approx(whole, rel=bound)
    assert rows and {r for _, r in rows} == {1}
    rows.clear()
    assert evaluate.reference_perplexity(model, val, Plan("fp32", micro_batch=2))["loss"] == pytest.approx(
        whole, abs=5e-5 + bound * whole)
    assert rows and max(r for _, r in rows) == 2
    rows.clear()
    plan = train.plan_run(model, s.BATCH_SIZE, s.MAX_LENGTH, "fp32")
    plan.micro_batch = 2  # as a 10 GB card's plan: 2 rows a pass
    train.train(model, data, val, train.TrainingConfig.from_settings(replace(s, MAX_STEPS=2)), tmp_path,
                log=lambda *_: None, plan=plan)
    assert {r for training, r in rows if not training} == {2} and max(r for _, r in rows) == 2


# ---------------------------------------------------------------- randomness and resume

class KernelDied(Exception):
    pass


def sample_an_answer(model, die_after=None):
    """What the notebook does between epochs: a sampled answer (it seeds the global generator)."""
    def on_epoch_end(epoch):
        generate.generate_ids(model(), [[464, 3290, 318]], generate.Decoding(4, temperature=0.9, seed=5))
        if epoch == die_after:
            raise KernelDied
    return on_epoch_end


def test_answers_sampled_between_epochs_leave_trainings_randomness_alone(small, uninterrupted, tmp_path):
    s, data, val, source = small
    holder = {}
    out = tmp_path / "sampled"

    def run_with(on_epoch_end):
        model = gpt.load_model(source, CPU, s.DROPOUT)
        holder["model"] = model
        return model, train.train(model, data, val, train.TrainingConfig.from_settings(s), out,
                                  on_epoch_end=on_epoch_end, log=lambda *_: None)

    whole = run_with(sample_an_answer(lambda: holder["model"]))
    assert_same(uninterrupted, whole)  # sampling changed nothing of the training
    out = tmp_path / "died"
    with pytest.raises(KernelDied):  # after the epoch-1 checkpoint, during the answer
        run_with(sample_an_answer(lambda: holder["model"], die_after=1))
    assert_same(uninterrupted, run_with(sample_an_answer(lambda: holder["model"])))


# ---------------------------------------------------------------- interrupts

def test_an_interrupt_writes_a_checkpoint_at_the_step_reached_and_the_rerun_continues_exactly(
        small, uninterrupted, tmp_path, monkeypatch):
    real, calls = train.train_step, []

    def interrupted_at_step_7(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # as Jupyter's Interrupt kernel would, inside the step
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(train, "train_step", interrupted_at_step_7)
        with pytest.raises(KeyboardInterrupt, match=r"Interrupted at step 6 of 10.*run this cell again.*"
                                                     r"step 7"):
            run(small, tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]
    assert saved["step"] == 6  # not CHECKPOINT_EVERY's 3
    assert_same(uninterrupted, run(small, tmp_path))


def test_ctrl_c_during_a_step_lands_after_it(small, uninterrupted, tmp_path, monkeypatch):
    passes = []

    def signalled(model, ids):
        if model.training:
            passes.append(1)
            if len(passes) == 4 * 1 + 1:  # the first pass of step 5 (one pass a step)
                os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as mp:
        watch_forward(mp, signalled)
        with pytest.raises(KeyboardInterrupt, match="Interrupted at step 5 of 10"):
            run(small, tmp_path)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 5
    assert_same(uninterrupted, run(small, tmp_path))


# ---------------------------------------------------------------- training longer

def test_max_steps_past_the_epochs_is_refused_before_training(small, tmp_path):
    with pytest.raises(MedQAError, match=r"MAX_STEPS=100 goes past the 10 optimizer steps that EPOCHS=2 "
                                         r"gives \(5 an epoch\).*EPOCHS=20"):
        run(small, tmp_path, MAX_STEPS=100)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_finished_run_continues_for_more_epochs_with_a_new_schedule(small, tmp_path):
    s = replace(small[0], OUTPUT_DIR=str(tmp_path / "one"), EPOCHS=1)
    settings.claim_output_dir(s)
    first, first_history = run(small, tmp_path / "one", EPOCHS=1)
    settings.claim_output_dir(replace(s, EPOCHS=3))  # more epochs continue the run in the folder
    with pytest.raises(MedQAError, match="EPOCHS: 3 there, 2 now"):
        settings.claim_output_dir(replace(s, EPOCHS=2))
    lrs = []
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        run(small, tmp_path / "one", EPOCHS=3, MAX_STEPS=12)  # stops inside the continuation
        resumed, history = run(small, tmp_path / "one", EPOCHS=3)
    finally:
        hook.remove()
    lr = small[0].LEARNING_RATE
    assert lrs[:3] == pytest.approx([0.0, lr / 2, lr])  # a new warm-up from the trained weights
    assert history[:len(first_history)] == first_history and history[-1]["step"] == 15
    assert {h.get("schedule") for h in history[len(first_history):]} == {2}
    schedules = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["state"]["schedules"]
    assert schedules == [{"first_step": 0, "first_epoch": 0, "last_epoch": 1},
                         {"first_step": 5, "first_epoch": 1, "last_epoch": 3}]
    run(small, tmp_path / "straight", EPOCHS=1)
    assert_same((resumed, history), run(small, tmp_path / "straight", EPOCHS=3))  # the stop changed nothing


def test_ctrl_c_as_a_new_schedule_begins_leaves_a_checkpoint_that_continues_exactly(small, tmp_path, monkeypatch):
    run(small, tmp_path / "one", EPOCHS=1)
    real, calls = training_run.make_schedule, []

    def signalled(run_):
        calls.append(1)
        if len(calls) == 2:  # resume's, then begin_schedule's for the added epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real(run_)

    with monkeypatch.context() as mp:
        mp.setattr(training_run, "make_schedule", signalled)
        with pytest.raises(KeyboardInterrupt, match="Interrupted at step 5 of 10"):
            run(small, tmp_path / "one", EPOCHS=2)
    run(small, tmp_path / "straight", EPOCHS=1)
    assert_same(run(small, tmp_path / "straight", EPOCHS=2), run(small, tmp_path / "one", EPOCHS=2))


# ---------------------------------------------------------------- the disk

def test_the_checkpoint_estimate_is_what_is_written(small, tmp_path):
    model, _ = run(small, tmp_path, MAX_STEPS=1)
    written = (tmp_path / "checkpoint.pt").stat().st_size
    assert disk.checkpoint_bytes(model) == pytest.approx(written, rel=0.02)
    model.save_pretrained(tmp_path / "model")
    weights = (tmp_path / "model" / "model.safetensors").stat().st_size
    assert disk.model_folder_bytes(model) == pytest.approx(weights, rel=0.02)


def test_a_disk_too_small_stops_the_run_before_training_with_the_figures_and_the_fixes(tiny_model, tmp_path,
                                                                                       monkeypatch):
    out = tmp_path / "run"
    need = disk.estimate(tiny_model, out).needed_bytes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage(10 * need, 9 * need, need // 2))
    with pytest.raises(MedQAError, match=r"Not enough disk.*writes up to .* [GM]iB into .*run.*checkpoint .* [GM]iB, "
                                         r"twice.*[GM]iB free.*short.*OUTPUT_DIR.*LORA_R"):
        train.plan_run(tiny_model, 8, 64, "fp32", out)
    assert not out.exists()
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage(10 * need, 0, 2 * need))
    plan = train.plan_run(tiny_model, 8, 64, "fp32", out)
    assert "memory plan:" in plan.summary() and "disk: the run writes up to" in plan.summary()


@pytest.mark.parametrize("short, says", [(1, "1 MiB short"), (100 * 2 ** 20, "100 MiB short"),
                                         (int(1.25 * 2 ** 30), "1.2 GiB short")])
def test_the_disk_refusal_never_says_a_zero_shortfall(tiny_model, tmp_path, monkeypatch, short, says):
    need = disk.estimate(tiny_model, tmp_path).needed_bytes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: usage(10 * need, 0, need - short))
    with pytest.raises(MedQAError, match=says) as refused:
        train.plan_run(tiny_model, 8, 64, "fp32", tmp_path)
    assert " 0.0 " not in str(refused.value) and " 0 MiB" not in str(refused.value)


def test_max_steps_past_epochs_is_refused_before_the_run_claims_its_folder():
    """The notebook checks the run's length before claim_output_dir writes run.json, the splits and the answers
    before fine-tuning: a refused MAX_STEPS leaves the folder as it was."""
    import json
    from pathlib import Path

    from medqa import settings

    cfg = settings.resolve({"PROFILE": "smoke", "MAX_STEPS": 11}, env={})
    with pytest.raises(MedQAError, match="MAX_STEPS=11 goes past the 10 optimizer steps"):
        train.check_max_steps(train.TrainingConfig.from_settings(cfg), 10)  # 10 batches an epoch, 1 epoch
    train.check_max_steps(train.TrainingConfig.from_settings(settings.resolve({"PROFILE": "smoke", "MAX_STEPS": 10},
                                                                               env={})), 10)
    notebook = json.loads((Path(__file__).resolve().parent.parent / "llm.ipynb").read_text())
    source = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert -1 < source.index("train.check_max_steps(") < source.index("settings.claim_output_dir(")
