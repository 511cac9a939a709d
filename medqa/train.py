"""Fine-tuning: the training step, the loop (`train`, resumable through medqa.training_run, and
`simple_loop`, the same losses in a few lines), the memory plan a run follows, and the loss curves."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.std import tqdm
from transformers import get_cosine_schedule_with_warmup

from medqa import disk, hardware
from medqa.batches import IGNORE, make_loader
from medqa.errors import MedQAError
from medqa.hardware import Plan, Workload
from medqa.model import count_parameters, count_trainable, enable_checkpointing
from medqa.store import save_figure
from medqa.training_run import (Training, above_the_bar, begin_schedule, interrupts_after_the_block, paused,
                                rng_state, save_checkpoint, set_rng_state, start, stop_if_not_finite,
                                stop_on_interrupt, terminate_as_interrupt)


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
        """The run settings this config names, in capitals."""
        return cls(**{f.name: getattr(settings, f.name.upper()) for f in fields(cls)})


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW with weight decay on the matrices only (not on biases and LayerNorm), fused where supported."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=next(model.parameters()).device.type in ("cuda", "cpu"))


def micro_batches(batch: dict, rows: int | None) -> list[dict]:
    """A batch cut into pieces of `rows` rows, each cut to its own longest row (the rest is padding)."""
    if rows is None or rows >= len(batch["input_ids"]):
        return [batch]
    pieces = [{k: v[i: i + rows] for k, v in batch.items()} for i in range(0, len(batch["input_ids"]), rows)]
    widths = [int(piece["attention_mask"].sum(1).max()) for piece in pieces]
    return [{k: v[:, :width] for k, v in piece.items()} for piece, width in zip(pieces, widths)]


class Step(NamedTuple):
    loss: torch.Tensor  # summed over the target tokens, on the device (reading it would wait for the step)
    n_targets: int
    n_tokens: int
    skipped: bool       # fp16: the gradient scaler skipped the step (its gradients overflowed)


def train_step(model, opt, group: list[dict], plan: Plan, scaler=None, schedule=None) -> Step:
    """One optimizer step over a group of batches (gradient accumulation), in the plan's precision and
    micro-batches. The loss is summed over the target tokens (labels -100, the prompt and the padding, do not
    count) and divided by the whole group's count, so every token weighs the same however the examples fall
    into batches and micro-batches. No attention mask: padding is on the right, where causal attention keeps
    every real token from seeing it. No KV cache: nothing here generates. fp16's gradient scaler keeps small
    gradients from vanishing; it skips a step whose gradients overflow, and then the schedule waits too."""
    device = next(model.parameters()).device
    n_targets = sum(int((b["labels"] != IGNORE).sum()) for b in group)  # counted on the host
    n_tokens = sum(int(b["attention_mask"].sum()) for b in group)
    total = torch.zeros((), device=device)
    for batch in group:
        for piece in micro_batches(batch, plan.micro_batch):
            with plan.autocast(device.type):  # the forward pass
                ids = hardware.to_device(piece["input_ids"], device)
                logits = model(input_ids=ids, use_cache=False).logits
            labels = hardware.to_device(piece["labels"], device)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                                   reduction="sum")
            scaled = loss / n_targets
            (scaler.scale(scaled) if scaler is not None else scaled).backward()  # the backward pass
            total += loss.detach()
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
    return Step(total, n_targets, n_tokens, skipped)


def loss_sum(model, batch: dict, plan: Plan) -> torch.Tensor:
    """The forward pass and the summed loss of train_step, for a pass without a step (mean_loss)."""
    device = next(model.parameters()).device
    with plan.autocast(device.type):
        logits = model(input_ids=hardware.to_device(batch["input_ids"], device), use_cache=False).logits
    labels = hardware.to_device(batch["labels"], device)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")


@torch.no_grad()
def mean_loss(model, loader, plan: Plan | None = None) -> float:
    """Average loss per target token over a loader, in the plan's precision and micro-batches (plan_run's, as
    training's: one precision for all a run reports); None: the device's default, whole batches."""
    device = next(model.parameters()).device
    plan = plan or Plan.default(device)
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    try:
        for batch in loader:
            for piece in micro_batches(batch, plan.micro_batch):
                total += loss_sum(model, piece, plan)
            count += int((batch["labels"] != IGNORE).sum())
    finally:
        model.train(was_training)
    return total.item() / max(count, 1)


def simple_loop(model, train_loader, val_loader, config: TrainingConfig, plan: Plan) -> list[dict]:
    """The loop train() runs, without what makes it resumable (checkpoints, interrupts, a run continued with
    more EPOCHS) or measured (throughput, the bar): the same steps and log points, and the same losses
    (tests/test_training_loop.py). `train_loader` comes from batches.make_loader."""
    opt = make_optimizer(model, config.learning_rate, config.weight_decay)
    steps = config.epochs * math.ceil(len(train_loader) / config.grad_accum)
    schedule = get_cosine_schedule_with_warmup(opt, min(config.warmup_steps, steps), steps)
    scaler = torch.amp.GradScaler(next(model.parameters()).device.type) if plan.precision == "fp16" else None
    torch.manual_seed(config.seed)
    model.train()
    history, step, window = [], 0, []
    for epoch in range(config.epochs):
        order = train_loader.batch_sampler.batches(epoch)  # another order each epoch
        for first in range(0, len(order), config.grad_accum):
            group = [train_loader.collate_fn([train_loader.dataset[i] for i in rows])
                     for rows in order[first: first + config.grad_accum]]
            window.append(train_step(model, opt, group, plan, scaler, schedule))
            step += 1
            if step % config.eval_every == 0 or first + config.grad_accum >= len(order):
                train_loss = sum(r.loss for r in window).item() / sum(r.n_targets for r in window)
                history.append({"step": step, "train_loss": round(train_loss, 5),
                                "val_loss": round(mean_loss(model, val_loader, plan), 5)})
                window = []
            if step == config.max_steps:
                return history
    return history


def plan_run(model, batch_size: int, max_length: int, precision: str | None = None, out_dir=None) -> Plan:
    """How this machine trains the model: precision (and why), memory plan and, given `out_dir`, what the run
    writes there against the free disk (too little stops here). Gradient checkpointing goes on if planned."""
    device = next(model.parameters()).device
    caps = hardware.capabilities(device)
    precision, reason = hardware.choose_precision(caps, precision)
    # the free memory was read with the model on the device already: its weights go back into the budget
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    work = Workload(count_parameters(model), count_trainable(model), model.config, max_length, precision,
                    attention_matrix=caps.kind == "mps")
    plan = hardware.plan_memory(caps, work, batch_size, resident_bytes=resident)
    plan.precision_reason = reason
    if out_dir is not None:
        estimate = disk.estimate(model, out_dir)
        disk.check(estimate)
        plan.disk_line = estimate.describe()
    if plan.checkpointing:
        enable_checkpointing(model)
    return plan


def train(model, train_data, val_loader, config: TrainingConfig, out_dir, on_epoch_end=None, log=print,
          plan: Plan | None = None) -> list[dict]:
    """Fine-tune `model` on `train_data` (a make_loader loader, or a dataset) in `plan` (plan_run's); the loss
    history. A checkpoint (out_dir/checkpoint.pt: every CHECKPOINT_EVERY steps, at MAX_STEPS, each epoch's
    end, an interrupt) resumes exactly; a finished run given more EPOCHS goes on with a new schedule."""
    loader = _training_loader(train_data, config)
    check_max_steps(config, len(loader))
    if plan is None:  # the notebook shows the plan it passes in; say it here when it was not shown
        plan = plan_run(model, config.batch_size, config.max_length, config.precision, out_dir)
        log(plan.summary())
    opt = make_optimizer(model, config.learning_rate, config.weight_decay)
    run = start(model, opt, config, plan, Path(out_dir), len(loader), log)
    model.train()
    # a text bar: a stored notebook shows a widget as first drawn ("0/22"), a text bar as it last was
    run.bar = tqdm(total=run.total_steps, initial=run.state.step, desc="fine-tuning", unit="step",
                   file=sys.stdout)
    run.lap_started = time.perf_counter()
    started = run.lap_started - run.state.seconds
    with terminate_as_interrupt():
        try:
            while run.state.epoch < config.epochs:
                with interrupts_after_the_block():  # never a new schedule's record beside the old one's state
                    begin_schedule(run, log)
                batches = loader.batch_sampler.batches(run.state.epoch)
                while run.state.pos < len(batches):
                    if config.max_steps is not None and run.state.step >= config.max_steps:
                        save_checkpoint(run)
                        with above_the_bar(run.bar):
                            log(f"Stopped at MAX_STEPS={config.max_steps}; re-run with a larger MAX_STEPS to "
                                f"continue.")
                        return run.state.history
                    group = [loader.collate_fn([loader.dataset[i] for i in rows])
                             for rows in batches[run.state.pos: run.state.pos + config.grad_accum]]
                    with interrupts_after_the_block():
                        take_step(run, group, log)
                        if run.state.step % config.eval_every == 0 or run.state.pos >= len(batches):
                            log_point(run, val_loader, started)
                        if run.state.step % config.checkpoint_every == 0 and run.state.pos < len(batches):
                            save_checkpoint(run)  # an epoch's end saves below
                with interrupts_after_the_block():  # the epoch is done: the checkpoint holds its end
                    run.state.epoch += 1
                    run.state.pos = 0
                    save_checkpoint(run)
                answer_between_epochs(run, on_epoch_end)
        except KeyboardInterrupt:
            raise stop_on_interrupt(run) from None
        except RuntimeError as err:
            if not hardware.is_out_of_memory(err):
                raise
            raise hardware.out_of_memory_error(run.device.type, run.state.step + 1, config.max_length,
                                               "") from err
        finally:
            run.bar.close()
    return run.state.history


def _training_loader(data, config: TrainingConfig) -> DataLoader:
    """`data` as a loader (make_loader's for a dataset); its sampler's `batches(epoch)` makes resume exact."""
    if not isinstance(data, DataLoader):
        return make_loader(data, config.batch_size, config.max_length, shuffle=True, seed=config.seed,
                           mask_prompt=config.mask_prompt)
    if not hasattr(data.batch_sampler, "batches"):
        raise MedQAError("train() needs a loader from medqa.batches.make_loader (its batch sampler gives "
                         "each epoch's batches, so that a resumed run sees the same ones): build it with "
                         "make_loader.")
    return data


def check_max_steps(config: TrainingConfig, batches_per_epoch: int) -> None:
    """MAX_STEPS stops a run early; it never makes one longer than its EPOCHS (checked before writing)."""
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None and config.max_steps > total:
        more = math.ceil(config.max_steps / steps_per_epoch)
        raise MedQAError(
            f"MAX_STEPS={config.max_steps} goes past the {total} optimizer steps that EPOCHS={config.epochs} "
            f"gives ({steps_per_epoch} an epoch): MAX_STEPS only stops a run early. Set MAX_STEPS to at most "
            f"{total} (or None), or set EPOCHS={more} to train longer (a finished run then continues from "
            f"its weights).")


def take_step(run: Training, group: list[dict], log) -> None:
    """One optimizer step and its counts in the state. A step that runs out of memory runs again from its
    start (partial gradients dropped, random state restored) as the corrected plan says; a resume keeps it."""
    run.step_rng = rng_state(run.device)
    while True:
        try:
            result = train_step(run.model, run.opt, group, run.plan, run.scaler, run.schedule)
            break
        except RuntimeError as err:
            if not hardware.is_out_of_memory(err):
                raise
        # out of the except block: the error's traceback, which holds the failed passes' tensors, is gone
        run.opt.zero_grad(set_to_none=True)
        hardware.release_cached_memory(run.device)
        set_rng_state(run.step_rng, run.device)
        rows = min(run.plan.micro_batch or run.config.batch_size, max(len(b["input_ids"]) for b in group))
        run.plan.after_out_of_memory(rows, run.state.step + 1, run.device.type)
        if run.plan.checkpointing:
            enable_checkpointing(run.model)
        run.state.memory = run.plan.memory_record()
        with above_the_bar(run.bar):
            log(run.plan.adaptations[-1])
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
    """Record train and validation loss and the train steps' throughput; stop on non-finite."""
    state = run.state
    if state.window_targets == 0:
        return
    with paused(run):
        stop_if_not_finite(run)
        train_loss = state.window_loss.item() / state.window_targets
        val_loss = mean_loss(run.model, val_loader, run.plan)
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


def answer_between_epochs(run: Training, on_epoch_end) -> None:
    """`on_epoch_end(epoch)` outside training's time and randomness: sampling draws from (and reseeds) the
    global generators, so training's are put back after, and a resume from the epoch's end goes on alike."""
    if on_epoch_end is None:
        return
    rng = rng_state(run.device)
    try:
        with paused(run), above_the_bar(run.bar):
            on_epoch_end(run.state.epoch)
    finally:
        set_rng_state(rng, run.device)


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
