"""Where the work runs and how: the device, its precision, and the memory plan a run follows and corrects
when it runs out of memory. Everything decides from `Capabilities`, so tests hand in made-up machines."""

from __future__ import annotations

import platform
import resource
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import psutil
import torch

from medqa.errors import MedQAError

GiB = 1024 ** 3
FIT_ADVICE = ("lower MAX_LENGTH (now {}), choose a smaller MODEL, or set LORA_R (e.g. 16) to train adapters "
              "only")  # for the errors that say a model does not fit
# Bytes the forward pass keeps for the backward pass per token, layer and unit of n_embd, with the fused
# GELU medqa.model loads, in 16 bits and fp32, as tests/test_memory_plan.py measures them
ACTIVATION_BYTES = {"half": 40, "fp32": 72}
CGROUP = Path("/sys/fs/cgroup")  # where Docker, Kubernetes, JupyterHub and Colab set a process's memory limit


@dataclass(frozen=True)
class Capabilities:
    kind: str                # "cuda" | "mps" | "cpu"
    name: str                # e.g. "Tesla T4", "AMD EPYC"
    native_bf16: bool        # computes bf16 in hardware, not by emulating it
    free_bytes: int | None   # free now, not counting what the loaded model takes (plan_memory adds it back)
    compute_capability: tuple[int, int] | None = None  # CUDA's (major, minor); None elsewhere or unknown


def pick_device() -> torch.device:
    """CUDA if there is a GPU, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def cpu_name() -> str:
    """The CPU's model name, as lscpu gives it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX, and kernels allowed to use them (ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA can
    hold them below AVX-512): otherwise a CPU emulates bf16 and runs it slower than fp32."""
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    try:
        onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's ISA, after ONEDNN_MAX_CPU_ISA
    except (AttributeError, RuntimeError):  # a private op: a torch without it says nothing either way
        onednn = True
    return bool(flags and onednn and torch.backends.cpu.get_cpu_capability() == "AVX512")


def _read_bytes(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 says "max" where there is no limit


def free_ram() -> int:
    """The RAM this process can take: the available RAM, or less where a cgroup or `ulimit -v` leaves less."""
    rooms = [psutil.virtual_memory().available]
    for limit, usage in (("memory.max", "memory.current"),
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        cap, used = _read_bytes(CGROUP / limit), _read_bytes(CGROUP / usage)
        if cap is not None and used is not None and cap < 2 ** 60:  # v1 writes "no limit" as about 2^63
            rooms.append(max(cap - used, 0))
            break
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        rooms.append(max(soft - psutil.Process().memory_info().vms, 0))
    return min(rooms)


def capabilities(device: torch.device) -> Capabilities:
    """What the device can do and how much memory it has free now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # the blocks PyTorch's allocator caches are used to the driver, yet this process's to reuse
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        # including_emulation=False: a T4 or V100 "supports" bf16 only by emulating it, slowly
        return Capabilities("cuda", torch.cuda.get_device_name(device),
                            torch.cuda.is_bf16_supported(including_emulation=False), free,
                            torch.cuda.get_device_capability(device))
    if device.type == "mps":
        # Metal counts the allocator's cached blocks as held: hand them back first
        torch.mps.empty_cache()
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return Capabilities("mps", "Apple silicon (MPS)", False, free)
    return Capabilities("cpu", cpu_name(), cpu_has_native_bf16(), free_ram())


@cache
def capabilities_cached(device: torch.device) -> Capabilities:
    """The capabilities without the free memory (which changes), read once per device and process."""
    return replace(capabilities(device), free_bytes=None)


def choose_precision(caps: Capabilities, requested: str | None = None) -> tuple[str, str]:
    """The precision to train in (PRECISION when set), and why, in words."""
    if requested is not None:
        return requested, "PRECISION is set"
    if caps.native_bf16 and caps.kind in ("cuda", "cpu"):
        return "bf16", f"{caps.name} computes bf16 natively"
    if caps.kind == "cuda":
        major = caps.compute_capability[0] if caps.compute_capability else None
        if major is not None and major < 7:
            return "fp32", (f"{caps.name} (compute capability {major}.{caps.compute_capability[1]}) has no "
                            f"fp16 tensor cores: fp16 would run slower than fp32")
        return "fp16", (f"{caps.name} has fp16 tensor cores but no native bf16 (loss scaling keeps small "
                        f"gradients)")
    if caps.kind == "mps":
        return "fp32", "half precision is not measured on MPS: fp32 is the safe choice"
    return "fp32", f"{caps.name} has neither AVX-512 BF16 nor AMX: bf16 would be emulated, slower than fp32"


@dataclass(frozen=True)
class Workload:
    """What a training step's memory depends on: the model's shape and the rows' length and precision."""
    n_params: int
    n_trainable: int
    config: object            # n_layer, n_embd, n_head, vocab_size (a GPT2Config)
    length: int               # tokens per row (MAX_LENGTH)
    precision: str
    attention_matrix: bool = False  # MPS has no fused attention kernel: it keeps the attention matrix

    def saved_bytes(self, rows: int, checkpointing: bool = False) -> int:
        """What one forward pass keeps for the backward pass (checkpointed: layer inputs, one layer's set)."""
        c, half = self.config, self.precision in ("bf16", "fp16")
        tokens = rows * self.length
        per_layer = ACTIVATION_BYTES["half" if half else "fp32"] * c.n_embd * tokens
        if self.attention_matrix:
            per_layer += c.n_head * self.length * self.length * 4 * rows
        layers = (c.n_layer * 4 * c.n_embd * tokens + per_layer) if checkpointing else c.n_layer * per_layer
        # the final LayerNorm's fp32 input, the LM head's input, the fp32 logits; token ids and statistics
        return layers + tokens * (c.n_embd * (4 + (2 if half else 4)) + c.vocab_size * 4 + 24)

    def peak_bytes(self, rows: int, checkpointing: bool = False) -> int:
        """Peak memory of a training step, as the backward pass starts."""
        half = self.precision in ("bf16", "fp16")
        # fp32 weights, gradients and AdamW's moments, autocast's 16-bit copy; log-softmax's two gradients
        static = self.n_params * 4 + self.n_trainable * (4 + 8) + (self.n_params * 2 if half else 0)
        logit_grads = rows * self.length * self.config.vocab_size * (4 + 4)
        return static + self.saved_bytes(rows, checkpointing) + logit_grads


def describe_passes(micro_batch: int, checkpointing: bool, batch_size: int) -> str:
    """How a batch is run, in words: whole, or in how many micro-batches; with gradient checkpointing."""
    passes = -(-batch_size // micro_batch)
    how = (f"the whole batch of {batch_size} in one pass" if passes == 1 else
           f"micro-batches of {micro_batch} row{'s' if micro_batch > 1 else ''}, {passes} passes per batch "
           f"(same effective batch)")
    return how + (", gradient checkpointing" if checkpointing else "")


def ways_to_run(batch_size: int) -> list[tuple[int, bool]]:
    """(rows per pass, gradient checkpointing), from the whole batch by halves to one row checkpointed."""
    sizes = [batch_size]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    return [(rows, False) for rows in sizes] + [(1, True)]


@dataclass
class Plan:
    """How every forward pass runs: its precision, and passes of how many rows (ways_to_run, moved down)."""
    precision: str = "fp32"
    micro_batch: int | None = None  # rows per forward/backward; None: the whole batch
    checkpointing: bool = False     # gradient checkpointing: recompute each layer's activations backward
    peak_bytes: int = 0             # expected peak of this plan
    budget_bytes: int | None = None
    batch_size: int = 1
    max_length: int = 0
    device: str = ""                # e.g. "cuda (Tesla T4)"
    precision_reason: str = ""
    adaptations: list[str] = field(default_factory=list)  # how training adapted after running out of memory
    disk_line: str = ""             # what the run writes into OUTPUT_DIR and what is free (medqa.disk)

    @classmethod
    def default(cls, device: torch.device) -> Plan:
        """The precision a device computes in when no run setting says otherwise, whole batches."""
        return cls("fp32" if device.type == "meta" else choose_precision(capabilities_cached(device))[0])

    def autocast(self, device_type: str):
        """The autocast context of the plan's precision (none in fp32)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)

    def describe(self) -> str:
        """The plan in words: its passes and expected peak against the budget."""
        budget = "unknown" if self.budget_bytes is None else f"{self.budget_bytes / GiB:.1f} GiB"
        passes = describe_passes(self.micro_batch or self.batch_size, self.checkpointing, self.batch_size)
        return f"memory plan: {passes}; expected peak {self.peak_bytes / GiB:.1f} GiB of {budget} available"

    def summary(self) -> str:
        """The lines the notebook prints before training."""
        lines = [f"{self.device}, {self.precision} ({self.precision_reason}); {self.describe()}"]
        return "\n".join(lines + ([self.disk_line] if self.disk_line else []))

    def record(self) -> dict:
        """What metrics.json keeps of the plan."""
        rec = {"device": self.device, "precision": self.precision, "precision_reason": self.precision_reason,
               "micro_batch": self.micro_batch, "gradient_checkpointing": self.checkpointing,
               "expected_peak_gib": round(self.peak_bytes / GiB, 2),
               "budget_gib": None if self.budget_bytes is None else round(self.budget_bytes / GiB, 2),
               "memory_plan": self.describe(), "disk": self.disk_line}
        return rec | ({"memory_adaptations": list(self.adaptations)} if self.adaptations else {})

    def after_out_of_memory(self, rows: int, step: int, kind: str) -> None:
        """Move to the next way to run after running out of memory, or raise the error naming the fix."""
        if rows > 1:
            self.micro_batch = next(r for r, _ in ways_to_run(self.batch_size) if r < rows)
        elif not self.checkpointing:
            self.checkpointing = True
        else:
            raise out_of_memory_error(kind, step, self.max_length,
                                      " even one row at a time with gradient checkpointing")
        how = describe_passes(self.micro_batch, self.checkpointing, self.batch_size)
        self.adaptations.append(f"Out of memory at step {step}: running it again with {how}.")

    def memory_record(self) -> dict:
        """What a checkpoint keeps of the adapted plan, so that a resume on this device starts with it."""
        return {"device": self.device, "micro_batch": self.micro_batch,
                "gradient_checkpointing": self.checkpointing, "memory_adaptations": list(self.adaptations)}

    def resume_adapted(self, memory: dict | None) -> bool:
        """Whether a resume starts from what the run adapted to on this device (a fresh plan fails again)."""
        if memory is None or memory["device"] != self.device:
            return False
        self.micro_batch = min(self.micro_batch or self.batch_size, memory["micro_batch"])
        self.checkpointing = self.checkpointing or memory["gradient_checkpointing"]
        self.adaptations = list(memory["memory_adaptations"])
        return True


def plan_memory(caps: Capabilities, work: Workload, batch_size: int, resident_bytes: int = 0,
                headroom: float = 0.85) -> Plan:
    """The first of ways_to_run whose peak fits `headroom` of the free and the model's `resident_bytes`."""
    budget = None if caps.free_bytes is None else int((caps.free_bytes + resident_bytes) * headroom)
    for rows, checkpointing in ways_to_run(batch_size):
        peak = work.peak_bytes(rows, checkpointing)
        if budget is None or peak <= budget:
            return Plan(work.precision, rows, checkpointing, peak, budget, batch_size=batch_size,
                        max_length=work.length, device=f"{caps.kind} ({caps.name})")
    raise MedQAError(
        f"The model does not fit the {budget / GiB:.1f} GiB available on this {caps.kind} device "
        f"({caps.name}) even one row at a time with gradient checkpointing (about {peak / GiB:.1f} GiB): "
        f"{FIT_ADVICE.format(work.length)}.")


def choose_profile(caps: Capabilities) -> tuple[str, str]:
    """`full` on a CUDA GPU where gpt2-medium's training fits the free memory, else `cpu`; and why."""
    if caps.kind != "cuda":
        return "cpu", f"no CUDA GPU ({caps.kind}): GPT-2 124M on 1,000 examples"
    from transformers import GPT2Config

    n_params = 354_823_168  # gpt2-medium's: the LM head shares the token embedding
    work = Workload(n_params, n_params, GPT2Config(n_layer=24, n_head=16, n_embd=1024), 1024,
                    choose_precision(caps)[0])
    try:
        plan = plan_memory(caps, work, 8)  # the full profile's batches of 8 x 1024 tokens
    except MedQAError:
        return "cpu", (f"{caps.name} has {caps.free_bytes / GiB:.1f} GiB free: too little to fine-tune "
                       f"gpt2-medium (the full profile), so GPT-2 124M (the cpu profile) trains on it")
    how = describe_passes(plan.micro_batch, plan.checkpointing, 8)
    return "full", f"{caps.name}: gpt2-medium fits with {how}"


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an error is the device (CUDA, MPS, the CPU's allocator, cuBLAS) running out of memory."""
    from accelerate.utils.memory import should_reduce_batch_size

    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and (
        should_reduce_batch_size(err) or "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text))


def out_of_memory_error(kind: str, step: int, max_length: int, how: str) -> MedQAError:
    """The error when training runs out of memory where adapting cannot help (or helped no more)."""
    return MedQAError(
        f"Out of {kind} memory at step {step}{how}. Close what else holds the device's memory "
        f"(another notebook's kernel, another process), restart this notebook's kernel (Colab: Runtime → "
        f"Restart session) so that nothing of this attempt stays in memory, and run again: training resumes "
        f"from the last checkpoint, which is kept. Otherwise {FIT_ADVICE.format(max_length)}, with "
        f"OVERWRITE=True (these settings define the run, so it starts afresh).")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device (CUDA and MPS run it asynchronously), before a clock is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_cached_memory(device: torch.device) -> None:
    """Hand the allocator's cached blocks back to the device, so that a smaller retry starts unfragmented."""
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).empty_cache()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device`: asynchronously only from pinned memory to CUDA (MPS could read it
    changed)."""
    return tensor.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())
