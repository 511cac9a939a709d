"""Training: the loss falls, an interrupted run resumes to the same end, runs are never clobbered, NaN stops."""

import json
import math
from dataclasses import replace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from medqa import batches, data, model as gpt, settings, split, train, training_run
from medqa.errors import MedQAError
from tests.sample_data import write_sample_csv


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("train")
    df, _ = data.clean(data.read_table(write_sample_csv(root / "m.csv")))
    df = batches.encode_examples(data.sample_rows(df, 120, 0), tokenizer)
    tr, va, _ = split.split_by_question(df, 0.1, 0.05, 0)
    s = settings.resolve({"PROFILE": "smoke", "MAX_LENGTH": 96, "BATCH_SIZE": 4, "GRAD_ACCUM": 2, "EPOCHS": 2,
                          "EVAL_EVERY": 3, "EVAL_BATCHES": 2, "CHECKPOINT_EVERY": 4, "WARMUP_STEPS": 2,
                          "DROPOUT": 0.1}, env={})  # dropout on: resuming must restore the random state too
    train_set, val_set = batches.QADataset(tr, s.MAX_LENGTH), batches.QADataset(va, s.MAX_LENGTH)
    val_loader = batches.make_loader(val_set, s.BATCH_SIZE, s.MAX_LENGTH, shuffle=False)
    source = str(gpt.build_tiny_gpt2(root / "tiny", seed=0))
    return s, train_set, val_loader, source


def run(setup, out_dir, dataset=None, **overrides):
    s, train_set, val_loader, source = setup
    s = replace(s, OUTPUT_DIR=str(out_dir), **overrides)
    model = gpt.load_model(source, torch.device("cpu"), s.DROPOUT)
    history = train.train(model, dataset or train_set, val_loader, train.TrainingConfig.from_settings(s), out_dir, log=lambda *_: None)
    return model, history


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    return run(setup, tmp_path_factory.mktemp("a"))


def losses(history):
    return [v for h in history for v in (h["step"], h["tokens_seen"], h["train_loss"], h["val_loss"])]


def assert_same_run(a, b):
    (ma, ha), (mb, hb) = a, b
    # the same kernels on the same numbers in the same order, on one machine: the same bits. (A tolerance would
    # not do: AdamW turns a rounding difference in a gradient near zero into a whole step of its weight.)
    assert losses(ha) == losses(hb)
    for (name, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_training_loss_falls(uninterrupted):
    _, history = uninterrupted
    assert len(history) >= 4 and history[-1]["train_loss"] < history[0]["train_loss"] - 0.5


def test_a_run_stopped_by_max_steps_resumes_to_the_same_end(setup, uninterrupted, tmp_path):
    _, partial = run(setup, tmp_path, MAX_STEPS=5)
    assert partial[-1]["step"] == 3  # stopped early
    assert_same_run(uninterrupted, run(setup, tmp_path))


class KernelDied(Exception):
    """A crash that writes nothing (an interrupt, unlike this, writes a checkpoint: test_interrupt.py)."""


class Crashing(torch.utils.data.Dataset):
    """The training set, until the n-th example is asked for: then the 'kernel dies'."""

    def __init__(self, base, n):
        self.base, self.n, self.lengths = base, n, base.lengths

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.n -= 1
        if self.n < 0:
            raise KernelDied
        return self.base[i]


def test_a_run_interrupted_by_an_exception_resumes_to_the_same_end(setup, uninterrupted, tmp_path):
    _, train_set, _, _ = setup
    with pytest.raises(KernelDied):
        run(setup, tmp_path, dataset=Crashing(train_set, 4 * 2 * 7 + 3))  # during step 8, after the step-4 checkpoint
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 4
    assert_same_run(uninterrupted, run(setup, tmp_path))


def test_a_finished_run_is_not_trained_again(setup, uninterrupted, tmp_path):
    model, history = run(setup, tmp_path)
    again, history_again = run(setup, tmp_path)
    assert history_again == history
    assert_same_run((model, history), (again, history_again))


def test_other_settings_never_clobber_a_run(setup, tmp_path):
    s = replace(setup[0], OUTPUT_DIR=str(tmp_path))
    settings.claim_output_dir(s)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(MedQAError) as err:
        settings.claim_output_dir(replace(s, LEARNING_RATE=1e-4, SEED=5))
    message = str(err.value)
    for words in ("LEARNING_RATE: 0.005 there, 0.0001 now", "SEED: 123 there, 5 now", "OUTPUT_DIR", "OVERWRITE=True"):
        assert words in message
    assert (tmp_path / "metrics.json").exists() and json.loads((tmp_path / "run.json").read_text())["SEED"] == 123
    settings.claim_output_dir(replace(s, SEED=5, OVERWRITE=True))
    assert not (tmp_path / "metrics.json").exists() and json.loads((tmp_path / "run.json").read_text())["SEED"] == 5


def test_weights_that_stop_being_finite_never_overwrite_the_last_good_checkpoint(setup, tmp_path):
    """A step leaves inf in the weights (as a too-high learning rate does) and a checkpoint is due at once."""
    s, train_set, val_loader, source = setup
    s = replace(s, OUTPUT_DIR=str(tmp_path), EPOCHS=1, EVAL_EVERY=1000, CHECKPOINT_EVERY=1)
    model = gpt.load_model(source, torch.device("cpu"))
    steps = []

    def blow_up(optimizer, args, kwargs):
        steps.append(len(steps) + 1)
        if steps[-1] == 3:
            with torch.no_grad():
                model.transformer.wte.weight[0, 0] = math.inf

    hook = register_optimizer_step_post_hook(blow_up)
    try:
        with pytest.raises(MedQAError, match="At step 3 the weights became inf or nan.*last good checkpoint.*"
                                             "LEARNING_RATE"):
            train.train(model, train_set, val_loader, train.TrainingConfig.from_settings(s), tmp_path, log=lambda *_: None)
    finally:
        hook.remove()
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert kept["state"]["step"] == 2 and steps == [1, 2, 3]  # stopped at the first save point that saw them
    assert all(bool(t.isfinite().all()) for t in kept["model"].values() if t.is_floating_point())


class Clock:
    """Seconds that pass only when the test says so."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class SlowLoader:
    """The validation loader, taking `seconds` of the clock on every pass."""

    def __init__(self, loader, clock, seconds):
        self.loader, self.clock, self.seconds = loader, clock, seconds

    def __iter__(self):
        self.clock.now += self.seconds
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)


@pytest.fixture(scope="module")
def clocked(setup, tmp_path_factory):
    """A run where every train step takes 1 s, every validation 1000 s, every checkpoint 100 s, every answer 500 s."""
    s, train_set, val_loader, source = setup
    out = tmp_path_factory.mktemp("clocked")
    s = replace(s, OUTPUT_DIR=str(out), EPOCHS=1, CHECKPOINT_EVERY=2)
    clock = Clock()
    model = gpt.load_model(source, torch.device("cpu"), s.DROPOUT)

    def lasting(seconds, action):
        def timed(*args, **kwargs):
            clock.now += seconds
            return action(*args, **kwargs)
        return timed

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "time", clock)
        mp.setattr(training_run, "time", clock)
        mp.setattr(train, "train_step", lasting(1.0, train.train_step))
        mp.setattr(training_run, "save_torch_atomic", lasting(100.0, training_run.save_torch_atomic))
        history = train.train(model, train_set, SlowLoader(val_loader, clock, 1000.0), train.TrainingConfig.from_settings(s), out,
                              on_epoch_end=lasting(500.0, lambda epoch: None), log=lambda *_: None)
    return s, model, history, val_loader


def test_tokens_per_second_counts_the_train_steps_only(clocked):
    _, _, history, _ = clocked
    assert len(history) >= 4
    previous = {"step": 0, "tokens_seen": 0}
    for h in history:
        steps, tokens = h["step"] - previous["step"], h["tokens_seen"] - previous["tokens_seen"]
        # one second per step; the history keeps one decimal
        assert h["tokens_per_s"] == pytest.approx(tokens / steps, abs=0.05)
        assert h["train_seconds"] == h["step"] and h["seconds"] > h["step"] + 1000
        previous = h


def test_the_validation_loss_is_that_of_the_whole_sample_it_is_given(clocked):
    s, model, history, val_loader = clocked
    assert len(val_loader) > s.EVAL_BATCHES  # the loader is the sample: all of it counts
    # the same computation on the same weights; the history keeps 5 decimals (5e-6)
    assert history[-1]["val_loss"] == pytest.approx(train.mean_loss(model, val_loader), abs=1e-5)
