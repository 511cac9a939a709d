"""Training on a GPU's terms, checked on the CPU: a step that runs out of memory (the CPU allocator's own error, as
under a cgroup or `ulimit -v` limit) is run again in smaller micro-batches (then with gradient checkpointing) and ends as an undisturbed step would; a resumed run keeps what it
adapted to and lets go of the loaded checkpoint; fp16 steps the gradient scaler skips leave the learning-rate
schedule where it was; lines printed during training never land inside the progress bar."""

import weakref
from dataclasses import replace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from transformers import GPT2LMHeadModel

from medqa import batches, model as gpt, train, training_run
from medqa.errors import MedQAError
from tests.test_training import assert_same_run, losses, setup  # noqa: F401 - setup is a fixture

CPU = torch.device("cpu")


def checkpointing(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


class OutOfMemory:
    """GPT-2's forward that runs out of memory on training passes (not validation ones) wider than `rows` rows, or
    without gradient checkpointing where `needs_checkpointing`, once `after` training passes went through: it asks
    the CPU allocator for more than any machine has, which raises the allocator's own RuntimeError."""

    def __init__(self, mp, rows=0, needs_checkpointing=False, after=0):
        self.rows, self.needs_checkpointing, self.after = rows, needs_checkpointing, after
        self.passes, real = [], GPT2LMHeadModel.forward

        def forward(model, *args, **kwargs):
            if model.training:
                rows = len(kwargs["input_ids"])
                self.passes.append(rows)
                if len(self.passes) > self.after and (rows > self.rows or
                                                      (self.needs_checkpointing and not checkpointing(model))):
                    torch.empty(2 ** 62, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory
            return real(model, *args, **kwargs)

        mp.setattr(GPT2LMHeadModel, "forward", forward)


def run(setup, out_dir, lines, val_loader=None, micro_batch=None, **overrides):  # noqa: F811
    s, train_set, setup_val_loader, source = setup
    s = replace(s, OUTPUT_DIR=str(out_dir), EPOCHS=1, DROPOUT=0.0, **overrides)
    model = gpt.load_model(source, CPU, s.DROPOUT)
    plan = train.plan_run(model, s.BATCH_SIZE, s.MAX_LENGTH, s.PRECISION)
    plan.micro_batch = micro_batch or plan.micro_batch
    history = train.train(model, train_set, val_loader or setup_val_loader, train.TrainingConfig.from_settings(s), out_dir, log=lines.append, plan=plan)
    return model, history, plan


@pytest.mark.numerics
def test_a_step_that_runs_out_of_memory_is_run_again_in_halves_and_ends_as_an_undisturbed_step(setup, tmp_path,
                                                                                             monkeypatch):
    """The step as it runs undisturbed in the micro-batches the retry ends with (that micro-batches change no numbers
    is test_hardware.test_micro_batches_give_the_same_step_as_the_whole_batch's to show): bit for bit the same, so no
    gradient of a failed pass is counted twice. Two batches a step: the first one's gradients are in when it fails."""
    s = setup[0]
    undisturbed, _, _ = run(setup, tmp_path / "a", [], MAX_STEPS=1, micro_batch=1)
    lines = []
    with monkeypatch.context() as mp:
        oom = OutOfMemory(mp, rows=1, after=1)
        adapted, _, plan = run(setup, tmp_path / "b", lines, MAX_STEPS=1)
    assert s.BATCH_SIZE == 4 and s.GRAD_ACCUM == 2
    assert oom.passes[:4] == [4, 4, 2, 1]  # failed with 4 rows (after the first batch), then with 2; fine with 1
    assert plan.micro_batch == 1 and len([line for line in lines if line.startswith("Out of memory")]) == 2
    assert all(torch.equal(pa, pb) for pa, pb in zip(undisturbed.parameters(), adapted.parameters()))


def test_training_adapts_to_running_out_of_memory_records_it_and_a_resumed_run_starts_with_it(setup, tmp_path,
                                                                                                monkeypatch):
    def adapting(out_dir, lines, max_steps):  # from the third step on, only one row at a time with checkpointing fits
        with monkeypatch.context() as mp:
            OutOfMemory(mp, rows=1, needs_checkpointing=True, after=2 * 2)
            return run(setup, out_dir, lines, MAX_STEPS=max_steps)

    lines = []
    _, _, plan = adapting(tmp_path / "adapted", lines, 4)
    adapted = [line for line in lines if line.startswith("Out of memory")]
    assert adapted == ["Out of memory at step 3: running it again with micro-batches of 2 rows, 2 passes per batch "
                       "(same effective batch).",
                       "Out of memory at step 3: running it again with micro-batches of 1 row, 4 passes per batch "
                       "(same effective batch).",
                       "Out of memory at step 3: running it again with micro-batches of 1 row, 4 passes per batch "
                       "(same effective batch), gradient checkpointing."]
    assert (plan.micro_batch, plan.checkpointing, plan.adaptations) == (1, True, adapted)
    memory = torch.load(tmp_path / "adapted" / "checkpoint.pt", weights_only=False)["state"]["memory"]
    assert (memory["micro_batch"], memory["gradient_checkpointing"]) == (1, True)

    lines, steps = [], []
    with monkeypatch.context() as mp:  # the same machine, nothing runs out of memory now: a fresh plan takes 4 rows
        real = train.train_step
        mp.setattr(train, "train_step", lambda m, opt, group, plan, *a: steps.append((plan.micro_batch, checkpointing(m)))
                   or real(m, opt, group, plan, *a))
        resumed, resumed_history, plan = run(setup, tmp_path / "adapted", lines, MAX_STEPS=6)
    assert "It ran out of memory here before, so it goes on with micro-batches of 1 row" in " ".join(lines)
    assert steps == [(1, True), (1, True)] and plan.adaptations == adapted
    assert_same_run(adapting(tmp_path / "uninterrupted", [], 6)[:2], (resumed, resumed_history))
    # A run that never ran out of memory trains alike. No rounding bound holds here: its sums run in another order,
    # and AdamW turns a rounding difference in a near-zero gradient into a step of about the learning rate, so after
    # 6 steps the weights may differ by up to 12 * lr each. That the micro-batches change a step only by rounding is
    # test_hardware.test_micro_batches_give_the_same_step_as_the_whole_batch's claim, with a bound from float32;
    # here a coarse 1% says only that the adapted run is the same training, not another.
    _, undisturbed_history, _ = run(setup, tmp_path / "undisturbed", [], MAX_STEPS=6)
    assert losses(resumed_history) == pytest.approx(losses(undisturbed_history), rel=1e-2)


def test_when_one_row_with_checkpointing_does_not_fit_the_error_names_the_fix_and_keeps_the_checkpoint(setup,
                                                                                                     tmp_path,
                                                                                                     monkeypatch):
    lines = []
    OutOfMemory(monkeypatch, rows=0, after=4 * 2)  # from step 5 nothing fits
    with pytest.raises(MedQAError, match="Out of cpu memory at step 5 even one row at a time with gradient "
                                         "checkpointing.*resumes from the last checkpoint.*MAX_LENGTH.*MODEL.*LORA_R"):
        run(setup, tmp_path, lines, CHECKPOINT_EVERY=4)
    assert len([line for line in lines if line.startswith("Out of memory")]) == 3
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["step"] == 4


def test_a_resumed_run_lets_go_of_the_checkpoint_it_loaded(setup, tmp_path, monkeypatch):
    run(setup, tmp_path, [], MAX_STEPS=2)

    class Loaded(dict):  # a dict that can be watched with a weak reference
        pass

    watched = []
    real_load = training_run.load_checkpoint

    def load(path):
        ckpt = Loaded(real_load(path))
        watched.extend([weakref.ref(ckpt), weakref.ref(ckpt["model"]["transformer.wte.weight"])])
        return ckpt

    alive = []
    real_step = train.train_step
    monkeypatch.setattr(training_run, "load_checkpoint", load)
    monkeypatch.setattr(train, "train_step", lambda *a, **k: alive.append([r() is not None for r in watched])
                        or real_step(*a, **k))
    run(setup, tmp_path, [], MAX_STEPS=3)
    assert len(watched) == 2 and alive == [[False, False]]


class OverflowOnce(torch.amp.GradScaler):
    """A gradient scaler whose first fp16 step overflows (a scale of 2^30) and whose back-off lands it at 2^14,
    where the tiny model's gradients fit: exactly one skipped step."""

    def __init__(self, device="cpu"):
        super().__init__(device, init_scale=2.0 ** 30, backoff_factor=2.0 ** -16)


def test_fp16_steps_the_scaler_skips_leave_the_schedule_where_it_was_and_are_recorded(setup, tmp_path, monkeypatch):
    s, _, val_loader, _ = setup
    monkeypatch.setattr(torch.amp, "GradScaler", OverflowOnce)
    fp16 = dict(PRECISION="fp16", GRAD_ACCUM=1, EVAL_EVERY=1,  # fp16 is slow on a CPU: small steps, one batch of
                val_loader=[next(iter(val_loader))])          # validation
    lrs = []
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        model, history, plan = run(setup, tmp_path / "a", [], MAX_STEPS=3, **fp16)
    finally:
        hook.remove()
    assert plan.precision == "fp16" and s.WARMUP_STEPS == 2
    # warm-up from 0 to LEARNING_RATE over two steps; the skipped first step does not count as one of them
    assert lrs == [0.0, 0.0, s.LEARNING_RATE / 2]
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["scheduler"]["last_epoch"] == 2
    assert [(h["skipped_steps"], h["loss_scale"]) for h in history] == [(1, 2.0 ** 14)] * 3
    # a run stopped after the skipped step resumes to the end an unstopped one reaches
    run(setup, tmp_path / "b", [], MAX_STEPS=1, **fp16)
    assert_same_run((model, history), run(setup, tmp_path / "b", [], MAX_STEPS=3, **fp16)[:2])


def test_lines_printed_during_training_stand_on_their_own_lines_above_the_bar(setup, tmp_path, capsys):
    s, train_set, val_loader, source = setup
    s = replace(s, OUTPUT_DIR=str(tmp_path), EPOCHS=2, DROPOUT=0.0, EVAL_EVERY=1000, MAX_STEPS=3)
    train_set = batches.QADataset(train_set.frame.head(2 * s.BATCH_SIZE * s.GRAD_ACCUM), s.MAX_LENGTH)  # 2 steps
    model = gpt.load_model(source, CPU, s.DROPOUT)
    train.train(model, train_set, val_loader, train.TrainingConfig.from_settings(s), tmp_path, on_epoch_end=lambda epoch: print(f"after epoch {epoch}"))
    out = capsys.readouterr().out
    starts = [line.split("\r")[-1] for line in out.split("\n")]  # what a line shows after its carriage returns
    assert "after epoch 1" in starts and f"Stopped at MAX_STEPS={s.MAX_STEPS}; re-run with a larger MAX_STEPS to " \
                                          "continue." in starts
