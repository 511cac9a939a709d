"""Step 9 and 10: fine-tuning with checkpoints that resume exactly, and the loss curves."""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.std import tqdm
from transformers import get_cosine_schedule_with_warmup

from medqa import device as hw
from medqa.batches import IGNORE, LengthGroupedBatches, collate
from medqa.errors import MedQAError
from medqa.model import count_parameters, count_trainable, enable_checkpointing
from medqa.store import load_checkpoint, save_figure, save_torch_atomic


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    """AdamW with weight decay on the matrices only (not on biases and LayerNorm), fused where supported."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cuda", "cpu"))


def loss_sum(model, batch: dict, device: torch.device, precision: str | None = None) -> torch.Tensor:
    """Summed next-token loss over the batch's target tokens (the caller divides by their count).

    No attention mask: padding is on the right, so causal attention already keeps every real token from
    seeing it, and the padding's own outputs have no targets. Without a mask, attention takes PyTorch's
    fused causal kernel instead of the masked fallback (tests/test_speed.py checks the losses are unchanged).
    No KV cache (GPT-2's config asks for one by default): nothing here generates, and the cache's copies of every
    layer's keys and values would stay for the backward pass.
    `precision` None: what the hardware computes natively (medqa.device.choose_precision).
    """
    dtype = hw.autocast_dtype(precision or hw.default_precision(device))
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(input_ids=batch["input_ids"].to(device, non_blocking=True), use_cache=False).logits
    labels = batch["labels"].to(device, non_blocking=True)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def mean_loss(model, loader, device, precision: str | None = None) -> float:
    """Average loss per target token over a loader (for validation: batches.sample_examples' fixed sample), in the
    precision training uses (None: the hardware's default), so that the numbers a run reports share one precision."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for batch in loader:
        total += loss_sum(model, batch, device, precision)
        count += int((batch["labels"] != IGNORE).sum())
    model.train(was_training)
    return total.item() / max(count, 1)


def micro_batches(batch: dict, rows: int) -> list[dict]:
    """A batch cut into pieces of `rows` rows, each cut to its own longest row (the rest is padding)."""
    if rows >= len(batch["input_ids"]):
        return [batch]
    pieces = []
    for i in range(0, len(batch["input_ids"]), rows):
        piece = {k: v[i: i + rows] for k, v in batch.items()}
        width = int(piece["attention_mask"].sum(1).max())
        pieces.append({k: v[:, :width] for k, v in piece.items()})
    return pieces


def _forward_backward(model, group: list[dict], device, precision, scaler, micro_batch: int | None,
                      n_targets: int) -> torch.Tensor:
    """The gradients of a group of batches, summed into the weights' .grad; returns the summed loss."""
    total = torch.zeros((), device=device)
    for b in group:
        for piece in micro_batches(b, micro_batch or len(b["input_ids"])):
            loss = loss_sum(model, piece, device, precision)
            scaled = loss / n_targets
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            total += loss.detach()
    return total


def train_step(model, opt, group: list[dict], device, precision: str | None = None, scaler=None,
               micro_batch: int | None = None, on_oom=None) -> tuple[torch.Tensor, int, int]:
    """One optimizer step over a group of batches (gradient accumulation), each in micro-batches if asked.

    The loss is divided by the target tokens of the whole group, so every token weighs the same however the
    examples fall into batches and micro-batches. With fp16 a gradient scaler keeps small gradients from
    vanishing (it skips the step when they overflow). Returns the summed loss (on the device: no sync), target
    and real-token counts.

    `on_oom(rows)`: when the forward and backward passes run out of device memory with `rows` rows per pass, the
    partial gradients are dropped, the allocator's cache is freed and on_oom returns the micro-batch to run the
    step again with (or raises). Micro-batches change the numbers only by rounding, so the step ends as it would
    have. Without it the error propagates.
    """
    n_targets = sum(int((b["labels"] != IGNORE).sum()) for b in group)  # counted on the host, before the forward
    n_tokens = sum(int(b["attention_mask"].sum()) for b in group)
    while True:
        try:
            total = _forward_backward(model, group, device, precision, scaler, micro_batch, n_targets)
            break
        except RuntimeError as err:
            if on_oom is None or not hw.is_out_of_memory(err):
                raise
        # out of the except block: the error's traceback, which holds the failed passes' tensors, is gone
        opt.zero_grad(set_to_none=True)
        hw.release_cached_memory(device)
        micro_batch = on_oom(min(micro_batch or math.inf, max(len(b["input_ids"]) for b in group)))
    if scaler is not None:
        scaler.unscale_(opt)  # clip the true gradients
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return total, n_targets, n_tokens


def plan_run(model, s) -> dict:
    """How this machine trains the model with settings `s`: device, precision and memory plan, printable and
    storable (metrics.json). Gradient checkpointing is switched on here when the plan needs it."""
    device = next(model.parameters()).device
    caps = hw.capabilities(device)
    precision = hw.choose_precision(caps, s.PRECISION)
    n_params, n_trainable = count_parameters(model), count_trainable(model)
    # the free memory was read with the model on the device already: its weights go back into the budget
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    plan = hw.plan_memory(caps, n_params, n_trainable, model.config, s.BATCH_SIZE, s.MAX_LENGTH, precision,
                          resident_bytes=resident)
    if plan.checkpointing:
        enable_checkpointing(model)
    return {"device": f"{device.type} ({caps.name})", "precision": precision,
            "micro_batch": plan.micro_batch, "gradient_checkpointing": plan.checkpointing,
            "expected_peak_gb": round(plan.peak_bytes / hw.GB, 2),
            "budget_gb": None if plan.budget_bytes is None else round(plan.budget_bytes / hw.GB, 2),
            "memory_plan": plan.describe(s.BATCH_SIZE)}


def _rng_state(device):
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


def _training_batches(data, s):
    """The dataset, batch order and collate function to train with: a loader's own (its batch sampler must say
    which batches each epoch has, `batches(epoch)`, for exact resume), or the project's for a bare dataset."""
    if isinstance(data, DataLoader):
        if not hasattr(data.batch_sampler, "batches"):
            raise MedQAError("train() needs a loader from medqa.batches.make_loader (its batch sampler gives each "
                             "epoch's batches, so that a resumed run sees the same ones): build it with make_loader.")
        return data.dataset, data.batch_sampler, data.collate_fn
    sampler = LengthGroupedBatches(data.lengths, s.BATCH_SIZE, seed=s.SEED, shuffle=True)
    return data, sampler, partial(collate, max_length=s.MAX_LENGTH, mask_prompt=s.MASK_PROMPT)


def train(model, train_data, val_loader, s, out_dir, on_epoch_end=None, log=print, plan=None) -> list[dict]:
    """Fine-tune `model` on `train_data` (the training loader, or a dataset) as settings `s` say; returns the
    loss history. `plan`: what plan_run returned (computed here when not given); it records how training adapted
    when it ran out of memory.

    A checkpoint goes to OUTPUT_DIR/checkpoint.pt every CHECKPOINT_EVERY steps, at MAX_STEPS and at each
    epoch's end. If one is there, training continues from it, and ends as an uninterrupted run would.
    """
    device = next(model.parameters()).device
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    train_set, sampler, make_batch = _training_batches(train_data, s)
    if plan is None:  # the notebook shows the plan it passes in; say it here when it was not shown
        plan = plan_run(model, s)
        log(f"{plan['device']}, {plan['precision']}; {plan['memory_plan']}")
    precision = plan["precision"]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    steps_per_epoch = math.ceil(len(sampler) / s.GRAD_ACCUM)
    total_steps = s.EPOCHS * steps_per_epoch  # MAX_STEPS stops early but never reshapes the schedule
    opt = make_optimizer(model, s.LEARNING_RATE, s.WEIGHT_DECAY, device)
    sched = get_cosine_schedule_with_warmup(opt, min(s.WARMUP_STEPS, total_steps), total_steps)

    torch.manual_seed(s.SEED)
    st = {"step": 0, "epoch": 0, "pos": 0, "tokens": 0, "seconds": 0.0, "history": [],
          "window_loss": torch.zeros((), device=device), "window_targets": 0, "window_tokens": 0}
    if ckpt_path.exists():
        try:
            ckpt = load_checkpoint(ckpt_path)
        except MedQAError:
            if not s.OVERWRITE:
                raise
            ckpt = None  # damaged inside, though its zip directory looked whole to claim_output_dir
            log(f"{ckpt_path} is damaged; OVERWRITE=True: training starts afresh and replaces it.")
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"], device)
            st = ckpt["state"]
            st["window_loss"] = st["window_loss"].to(device)
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
            log(f"Resuming from {ckpt_path.name}: step {st['step']} of {total_steps} (epoch {st['epoch'] + 1}).")
            if _resume_memory(model, plan, st.get("memory")):
                how = hw.describe_passes(plan["micro_batch"], plan["gradient_checkpointing"], s.BATCH_SIZE)
                log(f"It ran out of memory here before, so it goes on with {how}.")
        # Everything is copied where it belongs now. On a GPU the loaded checkpoint's host copies (weights and AdamW's
        # moments: about 3x the model, 4.3 GB for gpt2-medium) would otherwise sit in host RAM for the rest of
        # training; on the CPU the optimizer keeps the loaded moments themselves, and only the weights' copy goes.
        del ckpt
    if scaler is not None:  # the scale the next step starts with, and the steps the scaler skipped so far
        st.setdefault("loss_scale", scaler.get_scale())
        st.setdefault("skipped_steps", 0)
    else:  # resumed in another precision (PRECISION None follows the hardware): no scale to report from here on
        st.pop("loss_scale", None)

    def save():
        _stop_if_not_finite(st, model, s)  # never replace a good checkpoint with broken weights
        save_torch_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "rng": _rng_state(device), "state": st,
                           "scaler": scaler.state_dict() if scaler is not None else None}, ckpt_path)

    lap = [time.perf_counter()]

    @contextmanager
    def not_training():
        """Validation, checkpoints and answers between epochs do not count as training time (tokens_per_s)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the steps queued so far belong to training
        spent = time.perf_counter() - lap[0]
        st["train_seconds"] = st.get("train_seconds", 0.0) + spent
        st["window_seconds"] = st.get("window_seconds", 0.0) + spent
        try:
            yield
        finally:
            lap[0] = time.perf_counter()

    model.train()
    # A text bar, not a widget: a stored notebook shows a widget as it was first drawn ("0/22"), a text bar as it
    # last was, so a reader on GitHub sees the training that ran.
    bar = tqdm(total=total_steps, initial=st["step"], desc="fine-tuning", unit="step", file=sys.stdout)

    @contextmanager
    def above_bar():
        """Lines printed while the bar runs go above it on lines of their own (tqdm.write's way), not into it."""
        with bar.external_write_mode(nolock=True):  # no lock: on_epoch_end may draw bars of its own
            yield

    def on_oom(rows: int) -> int:
        line = _shrink_after_oom(model, plan, rows, st["step"] + 1, s, device)
        st["memory"] = {k: plan[k] for k in ("device", "micro_batch", "gradient_checkpointing",
                                             "memory_adaptations")}  # saved with the checkpoint: a resume keeps it
        with above_bar():
            log(line)
        return plan["micro_batch"]

    started = time.perf_counter() - st["seconds"]
    try:
        while st["epoch"] < s.EPOCHS:
            batches = sampler.batches(st["epoch"])
            while st["pos"] < len(batches):
                if s.MAX_STEPS is not None and st["step"] >= s.MAX_STEPS:
                    with not_training():
                        save()
                    with above_bar():
                        log(f"Stopped at MAX_STEPS={s.MAX_STEPS}; re-run with a larger MAX_STEPS to continue.")
                    return st["history"]
                group = [make_batch([train_set[i] for i in b]) for b in batches[st["pos"]: st["pos"] + s.GRAD_ACCUM]]
                loss, n_targets, n_tokens = train_step(model, opt, group, device, precision, scaler,
                                                       plan["micro_batch"], on_oom)
                if _optimizer_stepped(scaler, st):
                    sched.step()
                st["window_loss"] += loss
                st["window_targets"] += n_targets
                st["window_tokens"] += n_tokens
                st["step"] += 1
                st["pos"] += len(group)
                bar.update(1)
                if st["step"] % s.EVAL_EVERY == 0 or st["pos"] >= len(batches):
                    with not_training():
                        _log_point(st, model, val_loader, s, device, started, bar, precision)
                if st["step"] % s.CHECKPOINT_EVERY == 0 and st["pos"] < len(batches):  # an epoch's end saves below
                    with not_training():
                        save()
            st["epoch"] += 1
            st["pos"] = 0
            with not_training():
                save()
                if on_epoch_end is not None:
                    with above_bar():
                        on_epoch_end(st["epoch"])
    except RuntimeError as err:
        if not hw.is_out_of_memory(err):
            raise
        raise _out_of_memory(st["step"] + 1, device, s, "") from err
    finally:
        bar.close()
    return st["history"]


def _out_of_memory(step: int, device, s, how: str) -> MedQAError:
    """The error when training runs out of memory where adapting cannot help (or helped no more)."""
    return MedQAError(
        f"Out of {device.type} memory at step {step}{how}. Close what else holds the device's memory (another "
        f"notebook's kernel, another process), restart this notebook's kernel (Colab: Runtime → Restart session) "
        f"so that nothing of this attempt stays in memory, and run again: training resumes from the last "
        f"checkpoint, which is kept. Otherwise {hw.fit_advice(s.MAX_LENGTH)}, with OVERWRITE=True (these settings define the run, so "
        f"it starts afresh).")


def _shrink_after_oom(model, plan: dict, rows: int, step: int, s, device) -> str:
    """After the passes of a step ran out of memory with `rows` rows each: half the micro-batch, and at one row
    gradient checkpointing; `plan` records it. Returns the line to print; when nothing is left to shrink, raises
    the error that names the fix."""
    if rows > 1:
        plan["micro_batch"] = -(-rows // 2)
    elif not plan["gradient_checkpointing"]:
        enable_checkpointing(model)
        plan["gradient_checkpointing"] = True
    else:
        raise _out_of_memory(step, device, s, " even one row at a time with gradient checkpointing")
    how = hw.describe_passes(plan["micro_batch"], plan["gradient_checkpointing"], s.BATCH_SIZE)
    line = f"Out of memory at step {step}: running it again with {how}."
    plan["memory_adaptations"] = plan.get("memory_adaptations", []) + [line]
    return line


def _resume_memory(model, plan: dict, memory: dict | None) -> bool:
    """A run resumed on the device it ran out of memory on starts with the micro-batch and checkpointing it adapted
    to (its fresh plan would run out again); on another device the fresh plan stands. Whether it changed the plan."""
    if memory is None or memory["device"] != plan["device"]:
        return False
    plan["micro_batch"] = min(plan["micro_batch"], memory["micro_batch"])
    if memory["gradient_checkpointing"] and not plan["gradient_checkpointing"]:
        enable_checkpointing(model)
        plan["gradient_checkpointing"] = True
    plan["memory_adaptations"] = memory["memory_adaptations"]
    return True


def _optimizer_stepped(scaler, st) -> bool:
    """Whether the optimizer step just taken happened, so that the learning-rate schedule moves only with real steps.

    With fp16, GradScaler skips a step whose gradients overflowed and then halves its scale (it never lowers it
    otherwise); the scale and the count of skipped steps go into the history. Reading the scale waits for the step
    to finish on the GPU: only the fp16 path pays that.
    """
    if scaler is None:
        return True
    before, st["loss_scale"] = st["loss_scale"], scaler.get_scale()
    if st["loss_scale"] >= before:
        return True
    st["skipped_steps"] += 1
    return False


def _stop_if_not_finite(st, model, s) -> None:
    """Stop when the loss or the weights stop being finite: training cannot recover, and the last good checkpoint
    must stay as it is."""
    loss = float(st["window_loss"])
    # one sync for all the weights, not one per tensor (hundreds on a GPU)
    if math.isfinite(loss) and bool(torch.stack([p.isfinite().all() for p in model.parameters()]).all()):
        return
    what = f"the training loss became {loss}" if not math.isfinite(loss) else "the weights became inf or nan"
    raise MedQAError(f"At step {st['step']} {what}. The last good checkpoint is kept in OUTPUT_DIR; lower "
                     f"LEARNING_RATE (now {s.LEARNING_RATE}) and run again with OVERWRITE=True.")


def _log_point(st, model, val_loader, s, device, started, bar, precision: str) -> None:
    """Record train and validation loss, and the training throughput (train steps only); stop on non-finite."""
    if st["window_targets"] == 0:
        return
    _stop_if_not_finite(st, model, s)
    train_loss = st["window_loss"].item() / st["window_targets"]
    val_loss = mean_loss(model, val_loader, device, precision)
    st["tokens"] += st["window_tokens"]
    st["seconds"] = time.perf_counter() - started
    st["history"].append({"step": st["step"], "tokens_seen": st["tokens"], "train_loss": round(train_loss, 5),
                          "val_loss": round(val_loss, 5), "seconds": round(st["seconds"], 2),
                          "train_seconds": round(st["train_seconds"], 2),
                          "tokens_per_s": round(st["window_tokens"] / max(st["window_seconds"], 1e-9), 1)})
    if "loss_scale" in st:  # fp16: the gradient scaler's scale, and the steps it skipped so far
        st["history"][-1].update(loss_scale=st["loss_scale"], skipped_steps=st["skipped_steps"])
    bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
    st["window_loss"] = torch.zeros((), device=device)
    st["window_targets"] = st["window_tokens"] = 0
    st["window_seconds"] = 0.0


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
