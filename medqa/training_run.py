"""A training run in progress: its state, the checkpoint it resumes from exactly, its learning-rate schedules,
and the interrupts (Ctrl-C, SIGTERM) it holds until a step is whole. medqa.train's loop drives it."""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from tqdm.std import tqdm
from transformers import get_cosine_schedule_with_warmup

from medqa import hardware
from medqa.errors import MedQAError
from medqa.hardware import Plan
from medqa.model import enable_checkpointing
from medqa.store import load_checkpoint, save_torch_atomic


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


@dataclass
class Training:
    """A run in progress: the objects a step touches, the plan it follows and the state a checkpoint keeps."""
    model: torch.nn.Module
    config: object  # medqa.train.TrainingConfig
    plan: Plan
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
        """Optimizer steps over all the epochs."""
        return self.config.epochs * self.steps_per_epoch


def start(model, opt, config, plan: Plan, out_dir: Path, batches_per_epoch: int, log) -> Training:
    """The run of `model` with `opt` (train.make_optimizer's AdamW): from the checkpoint when there is one."""
    device = next(model.parameters()).device
    first = {"first_step": 0, "first_epoch": 0, "last_epoch": config.epochs}
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    run = Training(model, config, plan, device, out_dir / "checkpoint.pt", steps_per_epoch, opt,
                   torch.amp.GradScaler(device.type) if plan.precision == "fp16" else None,
                   TrainingState(window_loss=torch.zeros((), device=device), schedules=[first]))
    torch.manual_seed(config.seed)
    checkpoint = None
    if run.checkpoint.exists():
        try:
            checkpoint = load_checkpoint(run.checkpoint)
        except MedQAError:  # damaged inside, though its zip directory looked whole to claim_output_dir
            if not config.overwrite:
                raise
            log(f"{run.checkpoint} is damaged; OVERWRITE=True: training starts afresh and replaces it.")
    if checkpoint is None:
        run.schedule = make_schedule(run)
    else:
        resume(run, checkpoint, log)
        del checkpoint  # its host copies of the weights and AdamW's moments would stay for the whole run
    if run.scaler is not None:  # the scale the next step starts with
        run.state.loss_scale = run.state.loss_scale or run.scaler.get_scale()
    else:  # resumed in another precision (PRECISION None follows the hardware): no scale to report now
        run.state.loss_scale = None
    return run


def resume(run: Training, checkpoint: dict, log) -> None:
    """Weights, optimizer, schedule, random state and the training state as the checkpoint saved them."""
    run.model.load_state_dict(checkpoint["model"])
    names = {f.name for f in fields(TrainingState)}  # names this class lacks are left out
    saved = TrainingState(**{k: v for k, v in checkpoint["state"].items() if k in names})
    run.state = replace(saved, window_loss=saved.window_loss.to(run.device),
                        schedules=saved.schedules or run.state.schedules)
    run.schedule = make_schedule(run)  # before the optimizer's state: a new schedule sets its learning rate
    run.opt.load_state_dict(checkpoint["optimizer"])
    run.schedule.load_state_dict(checkpoint["scheduler"])
    set_rng_state(checkpoint["rng"], run.device)
    if run.scaler is not None and checkpoint.get("scaler"):
        run.scaler.load_state_dict(checkpoint["scaler"])
    epoch = (f"end of epoch {run.state.epoch}" if run.state.pos == 0 and run.state.epoch > 0 else
             f"epoch {run.state.epoch + 1}")  # a checkpoint at an epoch's end belongs to that epoch
    log(f"Resuming from {run.checkpoint.name}: step {run.state.step} of {run.total_steps} ({epoch}).")
    if run.plan.resume_adapted(run.state.memory):
        if run.plan.checkpointing:
            enable_checkpointing(run.model)
        how = hardware.describe_passes(run.plan.micro_batch, run.plan.checkpointing, run.config.batch_size)
        log(f"It ran out of memory here before, so it goes on with {how}.")


def make_schedule(run: Training):
    """Linear warm-up and cosine decay over the current schedule's epochs (MAX_STEPS never reshapes it)."""
    current = run.state.schedules[-1]
    steps = (current["last_epoch"] - current["first_epoch"]) * run.steps_per_epoch
    return get_cosine_schedule_with_warmup(run.opt, min(run.config.warmup_steps, steps), steps)


def begin_schedule(run: Training, log) -> None:
    """A finished run that EPOCHS asks to go on gets a new warm-up and cosine schedule over the added epochs
    (a warm restart): stretching the old one would raise the learning rate in the middle of its decay."""
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


def save_checkpoint(run: Training) -> None:
    """The checkpoint at the step reached: never one with broken weights in place of a good one."""
    with paused(run):
        stop_if_not_finite(run)
        scaler = run.scaler.state_dict() if run.scaler is not None else None
        save_torch_atomic({"model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
                           "scheduler": run.schedule.state_dict(), "rng": rng_state(run.device),
                           "state": asdict(run.state), "scaler": scaler}, run.checkpoint)


def stop_on_interrupt(run: Training) -> KeyboardInterrupt:
    """The checkpoint of the last whole step (interrupts land between steps), and the interrupt to raise."""
    run.opt.zero_grad(set_to_none=True)  # a step cut short by an exception leaves partial gradients
    if run.step_rng is not None:  # ... and its dropout's draws: the step runs again from its start
        set_rng_state(run.step_rng, run.device)
    save_checkpoint(run)
    return KeyboardInterrupt(
        f"Interrupted at step {run.state.step} of {run.total_steps}; the checkpoint holds it: run this cell "
        f"again with the same settings and OUTPUT_DIR to continue from step {run.state.step + 1}.")


@contextmanager
def _handled(handler, *signums):
    """`handler` for the signals Python handles here (only the main thread can, where a handler is set)."""
    main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, handler) for signum in signums
                if main and signal.getsignal(signum) is not None}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def terminate_as_interrupt():
    """SIGTERM (sent by `timeout`, job schedulers, notebook servers) stops training as Ctrl-C does."""
    return _handled(signal.default_int_handler, signal.SIGTERM)


@contextmanager
def interrupts_after_the_block():
    """Hold SIGINT (Ctrl-C, Jupyter's Interrupt kernel) and SIGTERM until the block ends, so that neither
    lands inside an optimizer step or between a step and its counts; then raise KeyboardInterrupt."""
    received = []
    with _handled(lambda signum, frame: received.append(signum), signal.SIGINT, signal.SIGTERM):
        yield
    if received:
        raise KeyboardInterrupt


@contextmanager
def paused(run: Training):
    """Validation, checkpoints and answers between epochs do not count as training time (tokens_per_s)."""
    hardware.synchronize(run.device)  # the steps queued so far belong to training
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


def stop_if_not_finite(run: Training) -> None:
    """Stop when the loss or the weights stop being finite: the last good checkpoint must stay as it is."""
    loss = float(run.state.window_loss)
    # one sync for all the weights, not one per tensor
    if math.isfinite(loss) and bool(torch.stack([p.isfinite().all() for p in run.model.parameters()]).all()):
        return
    what = f"the training loss became {loss}" if not math.isfinite(loss) else "the weights became inf or nan"
    raise MedQAError(f"At step {run.state.step} {what}. The last good checkpoint is kept in OUTPUT_DIR; "
                     f"lower LEARNING_RATE (now {run.config.learning_rate}) and run again with "
                     f"OVERWRITE=True.")


def rng_state(device: torch.device) -> dict:
    """The random generators' states that training draws from (dropout): the CPU's and the device's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state saved; a checkpoint from a machine with more GPUs restores the GPUs present."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        for index, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])
