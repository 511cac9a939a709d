"""Fine-tuning with checkpoints that resume exactly (after a crash, a MAX_STEPS stop or an interrupt), and
the loss curves. `train` is the loop; the functions below it are its parts, in the order it calls them."""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.std import tqdm
from transformers import get_cosine_schedule_with_warmup

from medqa import device as devices
from medqa import disk
from medqa.batches import IGNORE, LengthGroupedBatches, collate
from medqa.device import MemoryPlan
from medqa.errors import MedQAError
from medqa.model import count_parameters, count_trainable, enable_checkpointing
from medqa.store import load_checkpoint, save_figure, save_torch_atomic


@dataclass(frozen=True)
class TrainingConfig:
    """The settings training uses (TrainingConfig.from_settings picks them from the notebook's settings)."""
    batch_size: int
    grad_accum: int
    epochs: int
    learning_rate: float
    weight_decay: float
    warmup_steps: int
    max_steps: int | None
    eval_every: int
    checkpoint_every: int
    max_length: int
    mask_prompt: bool
    seed: int
    precision: str | None = None   # None: what the hardware computes natively
    overwrite: bool = False

    @classmethod
    def from_settings(cls, settings) -> TrainingConfig:
        return cls(**{f.name: getattr(settings, f.name.upper()) for f in dataclasses.fields(cls)})


# ---------------------------------------------------------------- one step

def make_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    """AdamW with weight decay on the matrices only (not on biases and LayerNorm), fused where supported."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cuda", "cpu"))


def loss_sum(model, batch: dict, device: torch.device, precision: str | None = None) -> torch.Tensor:
    """Summed next-token loss over the batch's target tokens (the caller divides by their count).

    No attention mask: padding is on the right, so causal attention already keeps every real token from seeing
    it, and the padding's own outputs have no targets. Without a mask, attention takes PyTorch's fused causal
    kernel instead of the masked fallback (tests/test_speed.py checks the losses are unchanged). No KV cache
    (GPT-2's config asks for one by default): nothing here generates, and the cache's copies of every layer's
    keys and values would stay for the backward pass. `precision` None: what the hardware computes natively
    (medqa.device.choose_precision).
    """
    dtype = devices.autocast_dtype(precision or devices.default_precision(device))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(input_ids=devices.to_device(batch["input_ids"], device), use_cache=False).logits
    labels = devices.to_device(batch["labels"], device)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def micro_batches(batch: dict, rows: int | None) -> list[dict]:
    """A batch cut into pieces of `rows` rows, each cut to its own longest row (the rest is padding)."""
    if rows is None or rows >= len(batch["input_ids"]):
        return [batch]
    pieces = []
    for i in range(0, len(batch["input_ids"]), rows):
        piece = {k: v[i: i + rows] for k, v in batch.items()}
        width = int(piece["attention_mask"].sum(1).max())
        pieces.append({k: v[:, :width] for k, v in piece.items()})
    return pieces


@torch.no_grad()
def mean_loss(model, loader, device, precision: str | None = None, micro_batch: int | None = None) -> float:
    """Average loss per target token over a loader (for validation: batches.sample_examples' fixed sample),
    in the precision and the micro-batches training uses (the memory plan's), so that the numbers a run
    reports share one precision and no pass needs more memory than a training pass."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    try:
        for batch in loader:
            for piece in micro_batches(batch, micro_batch):
                total += loss_sum(model, piece, device, precision)
            count += int((batch["labels"] != IGNORE).sum())
    finally:
        model.train(was_training)
    return total.item() / max(count, 1)


class Step(NamedTuple):
    loss: torch.Tensor  # summed over the target tokens, on the device (reading it would wait for the step)
    n_targets: int
    n_tokens: int
    skipped: bool       # fp16: the gradient scaler skipped the step (its gradients overflowed)


def train_step(model, opt, group: list[dict], device, precision: str | None = None, scaler=None,
               micro_batch: int | None = None, on_oom=None, schedule=None) -> Step:
    """One optimizer step over a group of batches (gradient accumulation), each in micro-batches if asked.

    The loss is divided by the target tokens of the whole group, so every token weighs the same however the
    examples fall into batches and micro-batches. With fp16 a gradient scaler keeps small gradients from
    vanishing (it skips the step when they overflow, and then the schedule does not move either).
    `on_oom`: see accumulate_gradients.
    """
    # counted on the host, before the forward
    n_targets = sum(int((b["labels"] != IGNORE).sum()) for b in group)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in group)
    loss = accumulate_gradients(model, opt, group, device, precision, scaler, micro_batch, n_targets, on_oom)
    if scaler is not None:
        scaler.unscale_(opt)  # clip the true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    skipped = False
    if scaler is None:
        opt.step()
    else:
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < scale  # the scaler halves its scale only after a skipped step
    if schedule is not None and not skipped:
        schedule.step()
    opt.zero_grad(set_to_none=True)
    return Step(loss, n_targets, n_tokens, skipped)


def accumulate_gradients(model, opt, group, device, precision, scaler, micro_batch, n_targets, on_oom=None):
    """The gradients of a group of batches, summed into the weights' .grad; returns the summed loss.

    `on_oom(rows)`: when the passes run out of device memory with `rows` rows each, the partial gradients are
    dropped, the allocator's cache is freed and on_oom returns the micro-batch to run them again with (or
    raises). Micro-batches change the numbers only by rounding. Without it the error propagates.
    """
    while True:
        try:
            total = torch.zeros((), device=device)
            for batch in group:
                for piece in micro_batches(batch, micro_batch):
                    loss = loss_sum(model, piece, device, precision)
                    scaled = loss / n_targets
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    total += loss.detach()
            return total
        except RuntimeError as err:
            if on_oom is None or not devices.is_out_of_memory(err):
                raise
        # out of the except block: the error's traceback, which holds the failed passes' tensors, is gone
        opt.zero_grad(set_to_none=True)
        devices.release_cached_memory(device)
        micro_batch = on_oom(min(micro_batch or math.inf, max(len(b["input_ids"]) for b in group)))


# ---------------------------------------------------------------- the plan

def plan_run(model, batch_size: int, max_length: int, precision: str | None = None,
             out_dir=None) -> MemoryPlan:
    """How this machine trains the model: device, precision (and why) and memory plan, and, given
    `out_dir`, what the run writes there against the free disk (a disk too small stops here). Gradient
    checkpointing is switched on here when the plan needs it."""
    device = next(model.parameters()).device
    caps = devices.capabilities(device)
    precision, reason = devices.decide_precision(caps, precision)
    # the free memory was read with the model on the device already: its weights go back into the budget
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = devices.plan_memory(caps, count_parameters(model), count_trainable(model), model.config,
                               batch_size, max_length, precision, resident_bytes=resident)
    plan = dataclasses.replace(plan, precision_reason=reason)
    if out_dir is not None:
        estimate = disk.estimate(model, out_dir)
        disk.check(estimate)
        plan = dataclasses.replace(plan, disk_line=estimate.describe())
    if plan.checkpointing:
        enable_checkpointing(model)
    return plan


# ---------------------------------------------------------------- the loop

@dataclass
class TrainingState:
    """What a checkpoint keeps besides the weights, the optimizer and the schedule."""
    step: int = 0              # optimizer steps taken
    epoch: int = 0             # epochs finished
    pos: int = 0               # batches of the current epoch trained
    tokens: int = 0            # real tokens trained, up to the last log point
    seconds: float = 0.0       # wall time up to the last log point
    train_seconds: float = 0.0  # of which in train steps
    history: list = field(default_factory=list)
    window_loss: torch.Tensor | None = None  # since the last log point: summed loss, targets, tokens, seconds
    window_targets: int = 0
    window_tokens: int = 0
    window_seconds: float = 0.0
    loss_scale: float | None = None  # fp16: the gradient scaler's scale
    skipped_steps: int = 0
    memory: dict | None = None  # how training adapted after running out of memory, on which device
    # one {"first_step", "first_epoch", "last_epoch"} for each schedule: more than one in a continued run
    schedules: list = field(default_factory=list)

    def saved(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def restored(cls, saved: dict, device) -> TrainingState:
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        state.window_loss = state.window_loss.to(device)
        return state


@dataclass
class Training:
    """A run in progress: the objects a step touches, the plan it follows and the state a checkpoint keeps."""
    model: torch.nn.Module
    config: TrainingConfig
    plan: MemoryPlan
    device: torch.device
    checkpoint: Path
    steps_per_epoch: int
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    state: TrainingState
    schedule: torch.optim.lr_scheduler.LRScheduler | None = None
    bar: tqdm | None = None
    lap_started: float = 0.0  # when the current stretch of train steps began (time.perf_counter)
    step_rng: dict | None = None  # the random state before the step under way (None between steps)

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.steps_per_epoch


def train(model, train_data, val_loader, config: TrainingConfig, out_dir, on_epoch_end=None, log=print,
          plan: MemoryPlan | None = None) -> list[dict]:
    """Fine-tune `model` on `train_data` (the training loader, or a dataset); returns the loss history.
    `plan`: what plan_run returned (made here when not given).

    A checkpoint goes to OUTPUT_DIR/checkpoint.pt every CHECKPOINT_EVERY steps, at MAX_STEPS, at each epoch's
    end and when the kernel is interrupted. If one is there, training continues from it, and ends as an
    uninterrupted run would; a finished run given more EPOCHS goes on with a new schedule (begin_schedule).
    """
    train_set, sampler, make_batch = _training_batches(train_data, config)
    steps_per_epoch = math.ceil(len(sampler) / config.grad_accum)
    check_max_steps(config, steps_per_epoch)
    if plan is None:  # the notebook shows the plan it passes in; say it here when it was not shown
        plan = plan_run(model, config.batch_size, config.max_length, config.precision, out_dir)
        log(plan.summary())
    run = start(model, config, plan, Path(out_dir), steps_per_epoch, log)
    model.train()
    # A text bar, not a widget: a stored notebook shows a widget as it was first drawn ("0/22"), a text bar as
    # it last was, so a reader on GitHub sees the training that ran.
    run.bar = tqdm(total=run.total_steps, initial=run.state.step, desc="fine-tuning", unit="step",
                   file=sys.stdout)
    run.lap_started = time.perf_counter()
    started = run.lap_started - run.state.seconds
    try:
        while run.state.epoch < config.epochs:
            # a checkpoint never holds a new schedule's record beside the old schedule's state
            with interrupts_after_the_block():
                begin_schedule(run, log)
            batches = sampler.batches(run.state.epoch)
            while run.state.pos < len(batches):
                if config.max_steps is not None and run.state.step >= config.max_steps:
                    stop_at_max_steps(run, log)
                    return run.state.history
                chosen = batches[run.state.pos: run.state.pos + config.grad_accum]
                group = [make_batch([train_set[i] for i in b]) for b in chosen]
                with interrupts_after_the_block():
                    take_step(run, group, log)
                    if run.state.step % config.eval_every == 0 or run.state.pos >= len(batches):
                        log_point(run, val_loader, started)
                    if run.state.step % config.checkpoint_every == 0 and run.state.pos < len(batches):
                        save_checkpoint(run)  # an epoch's end saves below
            with interrupts_after_the_block():
                end_epoch(run)
            answer_between_epochs(run, on_epoch_end)
    except KeyboardInterrupt:
        raise stop_on_interrupt(run) from None
    except RuntimeError as err:
        if not devices.is_out_of_memory(err):
            raise
        raise _out_of_memory(run.state.step + 1, run.device, config.max_length, "") from err
    finally:
        run.bar.close()
    return run.state.history


def _training_batches(data, config: TrainingConfig):
    """The dataset, batch order and collate function to train with: a loader's own (its batch sampler must say
    which batches each epoch has, `batches(epoch)`, for exact resume), or the project's for a bare dataset."""
    if isinstance(data, DataLoader):
        if not hasattr(data.batch_sampler, "batches"):
            raise MedQAError("train() needs a loader from medqa.batches.make_loader (its batch sampler gives "
                             "each epoch's batches, so that a resumed run sees the same ones): build it with "
                             "make_loader.")
        return data.dataset, data.batch_sampler, data.collate_fn
    sampler = LengthGroupedBatches(data.lengths, config.batch_size, seed=config.seed, shuffle=True)
    return data, sampler, partial(collate, max_length=config.max_length, mask_prompt=config.mask_prompt)


def check_length(config: TrainingConfig, train_loader) -> None:
    """check_max_steps for the training loader, before the run claims its folder and writes anything."""
    check_max_steps(config, math.ceil(len(train_loader.batch_sampler) / config.grad_accum))


def check_max_steps(config: TrainingConfig, steps_per_epoch: int) -> None:
    """MAX_STEPS stops a run early; it never makes one longer than its EPOCHS."""
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None and config.max_steps > total:
        more = math.ceil(config.max_steps / steps_per_epoch)
        raise MedQAError(
            f"MAX_STEPS={config.max_steps} goes past the {total} optimizer steps that EPOCHS={config.epochs} "
            f"gives ({steps_per_epoch} an epoch): MAX_STEPS only stops a run early. Set MAX_STEPS to at most "
            f"{total} (or None), or set EPOCHS={more} to train longer (a finished run then continues from "
            f"its weights).")


def start(model, config: TrainingConfig, plan: MemoryPlan, out_dir: Path, steps_per_epoch: int,
          log) -> Training:
    """The optimizer, the gradient scaler (fp16) and the state: from the checkpoint when there is one."""
    device = next(model.parameters()).device
    first = {"first_step": 0, "first_epoch": 0, "last_epoch": config.epochs}
    run = Training(model, config, plan, device, out_dir / "checkpoint.pt", steps_per_epoch,
                   make_optimizer(model, config.learning_rate, config.weight_decay, device),
                   torch.amp.GradScaler(device.type) if plan.precision == "fp16" else None,
                   TrainingState(window_loss=torch.zeros((), device=device), schedules=[first]))
    torch.manual_seed(config.seed)
    checkpoint = _read_checkpoint(run.checkpoint, config.overwrite, log)
    if checkpoint is None:
        run.schedule = make_schedule(run)
    else:
        resume(run, checkpoint, log)
        # On a GPU the loaded checkpoint's host copies (weights and AdamW's moments: about 3x the model) would
        # otherwise sit in host RAM for the rest of training
        del checkpoint
    if run.scaler is not None:  # the scale the next step starts with
        run.state.loss_scale = run.state.loss_scale or run.scaler.get_scale()
    else:  # resumed in another precision (PRECISION None follows the hardware): no scale to report now
        run.state.loss_scale = None
    return run


def _read_checkpoint(path: Path, overwrite: bool, log) -> dict | None:
    if not path.exists():
        return None
    try:
        return load_checkpoint(path)
    except MedQAError:
        if not overwrite:
            raise
        log(f"{path} is damaged; OVERWRITE=True: training starts afresh and replaces it.")
        return None  # damaged inside, though its zip directory looked whole to claim_output_dir


def resume(run: Training, checkpoint: dict, log) -> None:
    """Weights, optimizer, schedule, random state and the training state as the checkpoint saved them."""
    run.model.load_state_dict(checkpoint["model"])
    saved = TrainingState.restored(checkpoint["state"], run.device)
    run.state = dataclasses.replace(saved, schedules=saved.schedules or run.state.schedules)
    run.schedule = make_schedule(run)  # before the optimizer's state: a new schedule sets its learning rate
    run.opt.load_state_dict(checkpoint["optimizer"])
    run.schedule.load_state_dict(checkpoint["scheduler"])
    devices.set_rng_state(checkpoint["rng"], run.device)
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    log(f"Resuming from {run.checkpoint.name}: step {run.state.step} of {run.total_steps} "
        f"(epoch {run.state.epoch + 1}).")
    if _resume_memory(run.model, run.plan, run.state.memory):
        log(f"It ran out of memory here before, so it goes on with {_passes(run)}.")


def make_schedule(run: Training):
    """Linear warm-up and cosine decay over the current schedule's epochs (MAX_STEPS never reshapes it)."""
    current = run.state.schedules[-1]
    steps = (current["last_epoch"] - current["first_epoch"]) * run.steps_per_epoch
    return get_cosine_schedule_with_warmup(run.opt, min(run.config.warmup_steps, steps), steps)


def begin_schedule(run: Training, log) -> None:
    """A run whose schedule ended (its learning rate decayed to zero) and that EPOCHS now asks to go on
    with gets a new warm-up and cosine schedule over the added epochs, from its weights and AdamW's
    moments. Stretching the old schedule instead would raise the learning rate again in the middle of the
    decay it already went through and change what the finished epochs meant; a new one is a warm restart,
    recorded in the checkpoint and in the history (`schedule`)."""
    current = run.state.schedules[-1]
    if run.state.epoch < current["last_epoch"]:
        return
    run.state.schedules.append({"first_step": run.state.step, "first_epoch": run.state.epoch,
                                "last_epoch": run.config.epochs})
    run.schedule = make_schedule(run)
    with above_the_bar(run.bar):
        log(f"Continuing the finished run for {run.config.epochs - run.state.epoch} more epoch(s): a new "
            f"warm-up and cosine schedule over steps {run.state.step + 1}-{run.total_steps}, from the "
            f"trained weights.")


def take_step(run: Training, group: list[dict], log) -> None:
    """One optimizer step as the plan says, and its counts in the state."""
    run.step_rng = devices.rng_state(run.device)
    result = train_step(run.model, run.opt, group, run.device, run.plan.precision, run.scaler,
                        run.plan.micro_batch, partial(adapt_to_oom, run, log), run.schedule)
    state = run.state
    if run.scaler is not None:
        state.loss_scale = run.scaler.get_scale()  # reading it waits for the step: only fp16 pays that
        state.skipped_steps += result.skipped
    state.window_loss += result.loss
    state.window_targets += result.n_targets
    state.window_tokens += result.n_tokens
    state.step += 1
    state.pos += len(group)
    run.step_rng = None
    run.bar.update(1)


def log_point(run: Training, val_loader, started: float) -> None:
    """Record train and validation loss, and the training throughput (train steps only); stop on
    non-finite."""
    state = run.state
    if state.window_targets == 0:
        return
    with paused(run):
        _stop_if_not_finite(run)
        train_loss = state.window_loss.item() / state.window_targets
        val_loss = mean_loss(run.model, val_loader, run.device, run.plan.precision, run.plan.micro_batch)
        state.tokens += state.window_tokens
        state.seconds = time.perf_counter() - started
        point = {"step": state.step, "tokens_seen": state.tokens, "train_loss": round(train_loss, 5),
                 "val_loss": round(val_loss, 5), "seconds": round(state.seconds, 2),
                 "train_seconds": round(state.train_seconds, 2),
                 "tokens_per_s": round(state.window_tokens / max(state.window_seconds, 1e-9), 1)}
        if state.loss_scale is not None:  # fp16: the gradient scaler's scale, and the steps it skipped so far
            point.update(loss_scale=state.loss_scale, skipped_steps=state.skipped_steps)
        if len(state.schedules) > 1:  # a continued run: which schedule the point belongs to
            point["schedule"] = len(state.schedules)
        state.history.append(point)
        run.bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        state.window_loss = torch.zeros((), device=run.device)
        state.window_targets = state.window_tokens = 0
        state.window_seconds = 0.0


def save_checkpoint(run: Training) -> None:
    """The checkpoint at the step reached: never one with broken weights in place of a good one."""
    with paused(run):
        _stop_if_not_finite(run)
        scaler = run.scaler.state_dict() if run.scaler is not None else None
        save_torch_atomic({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                           "scheduler": run.schedule.state_dict(), "rng": devices.rng_state(run.device),
                           "state": run.state.saved(), "scaler": scaler}, run.checkpoint)


def end_epoch(run: Training) -> None:
    run.state.epoch += 1
    run.state.pos = 0
    save_checkpoint(run)


def answer_between_epochs(run: Training, on_epoch_end) -> None:
    """`on_epoch_end(epoch)` (the notebook samples an answer), outside training's time and randomness:
    sampling draws from (and reseeds) the global generators, so training's state is put back afterwards,
    and a run resumed from the epoch's checkpoint goes on as this one does."""
    if on_epoch_end is None:
        return
    rng = devices.rng_state(run.device)
    try:
        with paused(run), above_the_bar(run.bar):
            on_epoch_end(run.state.epoch)
    finally:
        devices.set_rng_state(rng, run.device)


def stop_at_max_steps(run: Training, log) -> None:
    save_checkpoint(run)
    with above_the_bar(run.bar):
        log(f"Stopped at MAX_STEPS={run.config.max_steps}; re-run with a larger MAX_STEPS to continue.")


def stop_on_interrupt(run: Training) -> KeyboardInterrupt:
    """An interrupt (Jupyter's Interrupt kernel, Ctrl-C) lands between steps (interrupts_after_the_block): the
    state is that of the last whole step, so the checkpoint written here continues exactly."""
    run.opt.zero_grad(set_to_none=True)  # a step cut short by an exception leaves partial gradients
    if run.step_rng is not None:  # ... and its dropout's draws: the step runs again from its start
        devices.set_rng_state(run.step_rng, run.device)
    save_checkpoint(run)
    return KeyboardInterrupt(
        f"Interrupted at step {run.state.step} of {run.total_steps}; the checkpoint holds it: run this cell "
        f"again with the same settings and OUTPUT_DIR to continue from step {run.state.step + 1}.")


@contextmanager
def interrupts_after_the_block():
    """Hold SIGINT (Ctrl-C, Jupyter's Interrupt kernel) until the block ends, so that it never lands inside an
    optimizer step or between a step and its counts. Outside the main thread signals cannot be caught: the
    block runs as it is."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextmanager
def paused(run: Training):
    """Validation, checkpoints and answers between epochs do not count as training time (tokens_per_s)."""
    devices.synchronize(run.device)  # the steps queued so far belong to training
    spent = time.perf_counter() - run.lap_started
    run.state.train_seconds += spent
    run.state.window_seconds += spent
    try:
        yield
    finally:
        run.lap_started = time.perf_counter()


@contextmanager
def above_the_bar(bar):
    """Lines printed while the bar runs go above it on lines of their own (tqdm.write's way), not into it."""
    with bar.external_write_mode(nolock=True):  # no lock: on_epoch_end may draw bars of its own
        yield


# ---------------------------------------------------------------- running out of memory

def adapt_to_oom(run: Training, log, rows: int) -> int:
    """After a step's passes ran out of memory with `rows` rows each: the plan shrinks, and the state
    records it (saved with the checkpoint: a resume keeps it). Returns the micro-batch to run the step
    again with."""
    _shrink_after_oom(run.model, run.plan, rows, run.state.step + 1, run.config.max_length)
    run.state.memory = {"device": run.plan.device, "micro_batch": run.plan.micro_batch,
                        "gradient_checkpointing": run.plan.checkpointing,
                        "memory_adaptations": list(run.plan.adaptations)}
    with above_the_bar(run.bar):
        log(run.plan.adaptations[-1])
    return run.plan.micro_batch


def _passes(run: Training) -> str:
    return devices.describe_passes(run.plan.micro_batch, run.plan.checkpointing, run.config.batch_size)


def _out_of_memory(step: int, device, max_length: int, how: str) -> MedQAError:
    """The error when training runs out of memory where adapting cannot help (or helped no more)."""
    return MedQAError(
        f"Out of {device.type} memory at step {step}{how}. Close what else holds the device's memory "
        f"(another notebook's kernel, another process), restart this notebook's kernel (Colab: Runtime → "
        f"Restart session) so that nothing of this attempt stays in memory, and run again: training resumes "
        f"from the last checkpoint, which is kept. Otherwise {devices.fit_advice(max_length)}, with "
        f"OVERWRITE=True (these settings define the run, so it starts afresh).")


def _shrink_after_oom(model, plan: MemoryPlan, rows: int, step: int, max_length: int) -> None:
    """Half the micro-batch, and at one row gradient checkpointing; the plan's last adaptation says so. When
    nothing is left to shrink, raises the error that names the fix."""
    if rows > 1:
        plan.micro_batch = -(-rows // 2)
    elif not plan.checkpointing:
        enable_checkpointing(model)
        plan.checkpointing = True
    else:
        raise _out_of_memory(step, next(model.parameters()).device, max_length,
                             " even one row at a time with gradient checkpointing")
    how = devices.describe_passes(plan.micro_batch, plan.checkpointing, plan.batch_size)
    plan.adaptations.append(f"Out of memory at step {step}: running it again with {how}.")


def _resume_memory(model, plan: MemoryPlan, memory: dict | None) -> bool:
    """A run resumed on the device it ran out of memory on starts with the micro-batch and checkpointing it
    adapted to (its fresh plan would run out again); on another device the fresh plan stands. Whether it
    changed the plan."""
    if memory is None or memory["device"] != plan.device:
        return False
    plan.micro_batch = min(plan.micro_batch, memory["micro_batch"])
    if memory["gradient_checkpointing"] and not plan.checkpointing:
        enable_checkpointing(model)
        plan.checkpointing = True
    plan.adaptations = list(memory["memory_adaptations"])
    return True


def _stop_if_not_finite(run: Training) -> None:
    """Stop when the loss or the weights stop being finite: training cannot recover, and the last good
    checkpoint must stay as it is."""
    loss = float(run.state.window_loss)
    # one sync for all the weights, not one per tensor (hundreds on a GPU)
    if math.isfinite(loss) and bool(torch.stack([p.isfinite().all() for p in run.model.parameters()]).all()):
        return
    what = f"the training loss became {loss}" if not math.isfinite(loss) else "the weights became inf or nan"
    raise MedQAError(f"At step {run.state.step} {what}. The last good checkpoint is kept in OUTPUT_DIR; "
                     f"lower LEARNING_RATE (now {run.config.learning_rate}) and run again with "
                     f"OVERWRITE=True.")


def plot_losses(history: list[dict], path=None):
    """Train and validation loss against optimizer steps and against tokens seen."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key, label in ((axes[0], "step", "optimizer step"), (axes[1], "tokens_seen", "tokens seen")):
        x = [h[key] for h in history]
        ax.plot(x, [h["train_loss"] for h in history], label="train", marker=".")
        ax.plot(x, [h["val_loss"] for h in history], label="validation", marker=".", linestyle="--")
        ax.set_xlabel(label)
    axes[0].set_ylabel("loss per target token")
    axes[0].legend()
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig
