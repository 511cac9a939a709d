"""Where the work runs and how: the device, the precision it computes in, and a memory plan that fits.

Everything here decides from `Capabilities`, which `capabilities()` reads from the machine; tests hand in
made-up ones (a 16 GB T4 without bf16, an 80 GB H100, a 16 GB Mac, a CPU) to check every branch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from medqa.errors import MedQAError

GB = 1024 ** 3


@dataclass(frozen=True)
class Capabilities:
    kind: str                # "cuda" | "mps" | "cpu"
    name: str                # e.g. "Tesla T4", "AMD EPYC"
    native_bf16: bool        # computes bf16 in hardware (CUDA compute capability >= 8, AVX-512 BF16 / AMX)
    free_bytes: int | None   # memory this run may take (free GPU memory, MPS recommended maximum, available RAM)


def pick_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: without them a CPU emulates bf16 and runs it slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def capabilities(device: torch.device) -> Capabilities:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # including_emulation=False: a T4 or V100 "supports" bf16 only by emulating it, slowly
        return Capabilities("cuda", torch.cuda.get_device_name(device),
                            torch.cuda.is_bf16_supported(including_emulation=False), free)
    if device.type == "mps":
        # the share of unified memory Metal lets one process have, minus what it holds already
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return Capabilities("mps", "Apple silicon (MPS)", False, free)
    return Capabilities("cpu", cpu_name(), cpu_has_native_bf16(), _available_ram())


def choose_precision(caps: Capabilities, requested: str | None = None) -> str:
    """PRECISION when set, else the fastest the hardware computes natively.

    bf16 autocast on CUDA with native bf16 (Ampere and later) and on CPUs with AVX-512 BF16 or AMX (about 2x a
    fp32 training step of GPT-2 124M on an AMD EPYC with AVX-512 BF16, in profiling); fp16 autocast with a
    gradient scaler on older GPUs (T4, V100), whose tensor cores compute fp16 but not bf16; fp32 on MPS (not
    measured there, so the safe choice) and on CPUs that would only emulate bf16.
    """
    if requested is not None:
        return requested
    if caps.native_bf16 and caps.kind in ("cuda", "cpu"):
        return "bf16"
    if caps.kind == "cuda":
        return "fp16"
    return "fp32"


def autocast_dtype(precision: str):
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def default_precision(device: torch.device) -> str:
    """The precision a device computes in when no run setting says otherwise (validation, perplexity)."""
    if device.type == "meta":
        return "fp32"
    return choose_precision(capabilities_cached(device))


_CAPS: dict = {}


def capabilities_cached(device: torch.device) -> Capabilities:
    """The capabilities without the free memory (which changes), read once per device and process."""
    key = str(device)
    if key not in _CAPS:
        caps = capabilities(device)
        _CAPS[key] = Capabilities(caps.kind, caps.name, caps.native_bf16, None)
    return _CAPS[key]


# ---------------------------------------------------------------- memory

@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int         # rows per forward/backward; BATCH_SIZE / micro_batch passes make up one batch
    checkpointing: bool      # gradient checkpointing: recompute each layer's activations in the backward pass
    peak_bytes: int          # expected peak of this plan
    budget_bytes: int | None

    def describe(self, batch_size: int) -> str:
        passes = -(-batch_size // self.micro_batch)
        how = (f"the whole batch of {batch_size} in one pass" if passes == 1 else
               f"micro-batches of {self.micro_batch} rows, {passes} passes per batch (same effective batch)")
        budget = "unknown" if self.budget_bytes is None else f"{self.budget_bytes / GB:.1f} GB"
        return (f"memory plan: {how}{', gradient checkpointing' if self.checkpointing else ''}; "
                f"expected peak {self.peak_bytes / GB:.1f} GB of {budget} available")


def estimate_peak_bytes(n_params: int, n_trainable: int, n_layer: int, n_embd: int, n_head: int, vocab: int,
                        rows: int, length: int, precision: str, checkpointing: bool = False,
                        attention_matrix: bool = False) -> int:
    """Peak memory of one training step, from the model's and the batch's shapes.

    - fp32 weights, their gradients and AdamW's two moments (trainable parameters only), plus a 16-bit copy of
      the weights that autocast keeps during the step;
    - activations kept for the backward pass: about 34 * n_embd bytes per token per layer in 16 bits
      (Korthikanti et al. 2022, fused attention, no dropout masks), twice that in fp32; with checkpointing only
      each layer's input (n_embd values per token) plus one layer's full set;
    - the attention matrix (n_head * length^2 fp32 values per row and layer) where the fused kernels do not run;
    - the logits and the loss: B x T x 50257 in the autocast dtype, their fp32 copy, log-softmax and its gradient.
    """
    half = precision in ("bf16", "fp16")
    act = 2 if half else 4
    tokens = rows * length
    static = n_params * 4 + n_trainable * (4 + 8) + (n_params * 2 if half else 0)
    per_layer = 17 * n_embd * act * tokens
    if attention_matrix:
        per_layer += n_head * length * length * 4 * rows
    activations = (n_layer * n_embd * act * tokens + per_layer) if checkpointing else n_layer * per_layer
    logits = tokens * vocab * ((act if half else 0) + 4 + 4 + 4)
    return static + activations + logits


def plan_memory(caps: Capabilities, n_params: int, n_trainable: int, config, batch_size: int, max_length: int,
                precision: str, headroom: float = 0.85) -> MemoryPlan:
    """The largest micro-batch that fits `headroom` of the free memory; gradient checkpointing if none does.

    Splitting a batch into micro-batches changes no numbers: the loss is a sum over target tokens divided by the
    whole batch's count, and each row's result does not depend on the rows beside it (right padding, causal
    attention). `headroom` leaves room for the allocator's fragmentation and the framework's own buffers.
    """
    budget = None if caps.free_bytes is None else int(caps.free_bytes * headroom)
    shape = dict(n_params=n_params, n_trainable=n_trainable, n_layer=config.n_layer, n_embd=config.n_embd,
                 n_head=config.n_head, vocab=config.vocab_size, length=max_length, precision=precision,
                 attention_matrix=caps.kind == "mps")  # MPS has no fused attention kernel that saves memory
    sizes = [batch_size]
    while sizes[-1] > 1:
        sizes.append(-(-sizes[-1] // 2))
    for checkpointing in (False, True):
        for rows in sizes:
            peak = estimate_peak_bytes(rows=rows, checkpointing=checkpointing, **shape)
            if budget is None or peak <= budget:
                return MemoryPlan(rows, checkpointing, peak, budget)
    raise MedQAError(
        f"The model does not fit the {budget / GB:.1f} GB available on this {caps.kind} device ({caps.name}) even "
        f"one row at a time with gradient checkpointing (about {peak / GB:.1f} GB): lower MAX_LENGTH (now "
        f"{max_length}), choose a smaller MODEL, or set LORA_R (e.g. 16) to train adapters only.")
