"""Where the work runs and how: the device, the precision it computes in, and a memory plan that fits.

Everything here decides from `Capabilities`, which `capabilities()` reads from the machine; tests hand in
made-up ones (a 16 GB T4 without bf16, an 80 GB H100, a 16 GB Mac, a CPU) to check every branch here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from medqa.errors import MedQAError

GB = 1024 ** 3


@dataclass(frozen=True)
class Capabilities:
    kind: str                # "cuda" | "mps" | "cpu"
    name: str                # e.g. "Tesla T4", "AMD EPYC"
    native_bf16: bool        # computes bf16 in hardware (CUDA compute capability >= 8, AVX-512 BF16 / AMX)
    # memory free now (free GPU memory, MPS's recommended maximum less what Metal holds, available RAM): what
    # the model already loaded takes is not in it (plan_memory adds it back)
    free_bytes: int | None
    compute_capability: tuple[int, int] | None = None  # CUDA's (major, minor); None elsewhere or unknown


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
    """AVX-512 BF16 or AMX, and kernels allowed to use them: without them a CPU emulates bf16 and runs it
    slower than fp32.

    The flags come from the CPU itself; ATEN_CPU_CAPABILITY (PyTorch's own kernels) and ONEDNN_MAX_CPU_ISA
    (oneDNN's matrix products) can hold the kernels below AVX-512, and then bf16 is emulated as on a CPU
    without it."""
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    try:
        onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # oneDNN's ISA, after ONEDNN_MAX_CPU_ISA
    except (AttributeError, RuntimeError):  # a private op: a torch without it says nothing either way
        onednn = True
    return bool(flags and onednn and torch.backends.cpu.get_cpu_capability() == "AVX512")


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
        # blocks PyTorch's allocator caches (after an earlier run in this session, say) count as used to the
        # driver, yet are this process's to reuse
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        props = torch.cuda.get_device_properties(device)
        # including_emulation=False: a T4 or V100 "supports" bf16 only by emulating it, slowly
        return Capabilities("cuda", torch.cuda.get_device_name(device),
                            torch.cuda.is_bf16_supported(including_emulation=False), free,
                            (props.major, props.minor))
    if device.type == "mps":
        # Metal counts the allocator's cached blocks (after an earlier run in this session) as held: hand them
        # back first, so that the share of unified memory Metal lets one process have, less what it holds, is
        # what is free
        torch.mps.empty_cache()
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
        return Capabilities("mps", "Apple silicon (MPS)", False, free)
    return Capabilities("cpu", cpu_name(), cpu_has_native_bf16(), _available_ram())


def choose_precision(caps: Capabilities, requested: str | None = None) -> str:
    """PRECISION when set, else the fastest the hardware computes natively (decide_precision says why)."""
    return decide_precision(caps, requested)[0]


def decide_precision(caps: Capabilities, requested: str | None = None) -> tuple[str, str]:
    """The precision to train in, and why, in words.

    bf16 autocast where bf16 is computed natively: CUDA compute capability 8 and later, CPUs with AVX-512 BF16
    or AMX (faster there than fp32: benchmarks/profiles.py). fp16 autocast with a gradient scaler on Volta
    and Turing (T4, V100), whose tensor cores compute fp16 but not bf16. fp32 on Pascal and older (compute
    capability below 7), where fp16 runs at a small fraction of fp32 speed; on MPS (not measured there, so the
    safe choice); on CPUs that would only emulate bf16.
    """
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
        _CAPS[key] = dataclasses.replace(capabilities(device), free_bytes=None)
    return _CAPS[key]


# ---------------------------------------------------------------- memory

# Bytes the forward pass keeps for the backward pass, per token, per layer and per unit of n_embd. Counted
# with torch.autograd.graph.saved_tensors_hooks over a whole GPT-2 forward (tests/test_memory_plan.py measures
# it again on every run: torch 2.13, transformers 5.23, sdpa attention, gelu_pytorch_tanh, no KV cache,
# dropout 0): 36 under 16-bit autocast, 64 in fp32. Per layer and n_embd, in 16 bits: the two LayerNorms'
# inputs (the residual stream, which stays fp32: 4 + 4), the 16-bit inputs of attention's and the MLP's first
# projections (2 + 2), attention's q, k, v and output (6 + 2), the GELU's input and the MLP's second
# projection's input (8 + 8); in fp32 the 16-bit ones take twice as much. CUDA's autocast keeps the same
# tensors (LayerNorm computes in fp32 there too, the projections save their 16-bit inputs, the flash and
# memory-efficient kernels save q, k, v, the output and a small per-row logsumexp), which the CPU cannot show,
# so the constants leave a margin of 4 and 8: a copy of attention's output before its projection where a
# kernel returns another layout, the logsumexp's padding, and the 1-byte masks of the two residual dropouts
# when DROPOUT > 0. GPT-2's own `gelu_new` would keep three more 4 * n_embd tensors (60 and 112 instead of 36
# and 64): medqa.model swaps it for the fused `gelu_pytorch_tanh` when loading.
ACTIVATION_BYTES = {"half": 40, "fp32": 72}


@dataclass
class MemoryPlan:
    """How this machine runs the model: where, in which precision, and in passes of how many rows. Every
    forward pass on the device (training, validation, the reference perplexity) follows it. When training
    runs out of memory it takes fewer rows or checkpointing (medqa.train.adapt_to_oom), and `adaptations`
    says why: the plan the caller holds is the one metrics.json records."""
    micro_batch: int         # rows per forward/backward; BATCH_SIZE / micro_batch passes make up one batch
    checkpointing: bool      # gradient checkpointing: recompute each layer's activations in the backward pass
    peak_bytes: int          # expected peak of this plan
    budget_bytes: int | None
    batch_size: int | None = None
    device: str = ""          # e.g. "cuda (Tesla T4)"
    precision: str = "fp32"
    precision_reason: str = ""
    # the lines that said how training adapted after running out of memory
    adaptations: list[str] = field(default_factory=list)
    disk_line: str = ""       # what the run writes into OUTPUT_DIR and what is free (medqa.disk)

    def describe(self, batch_size: int | None = None) -> str:
        budget = "unknown" if self.budget_bytes is None else f"{self.budget_bytes / GB:.1f} GB"
        passes = describe_passes(self.micro_batch, self.checkpointing, batch_size or self.batch_size)
        return f"memory plan: {passes}; expected peak {self.peak_bytes / GB:.1f} GB of {budget} available"

    def summary(self) -> str:
        """The lines the notebook prints before training."""
        lines = [f"{self.device}, {self.precision} ({self.precision_reason}); {self.describe()}"]
        return "\n".join(lines + ([self.disk_line] if self.disk_line else []))

    def record(self) -> dict:
        """What metrics.json keeps of the plan."""
        rec = {"device": self.device, "precision": self.precision, "precision_reason": self.precision_reason,
               "micro_batch": self.micro_batch, "gradient_checkpointing": self.checkpointing,
               "expected_peak_gb": round(self.peak_bytes / GB, 2),
               "budget_gb": None if self.budget_bytes is None else round(self.budget_bytes / GB, 2),
               "memory_plan": self.describe(), "disk": self.disk_line}
        return rec | ({"memory_adaptations": list(self.adaptations)} if self.adaptations else {})


def describe_passes(micro_batch: int, checkpointing: bool, batch_size: int) -> str:
    passes = -(-batch_size // micro_batch)
    how = (f"the whole batch of {batch_size} in one pass" if passes == 1 else
           f"micro-batches of {micro_batch} row{'s' if micro_batch > 1 else ''}, {passes} passes per batch "
           f"(same effective batch)")
    return how + (", gradient checkpointing" if checkpointing else "")


def saved_bytes(n_layer: int, n_embd: int, n_head: int, vocab: int, rows: int, length: int, precision: str,
                checkpointing: bool = False, attention_matrix: bool = False) -> int:
    """What one forward pass keeps for the backward pass (the weights' 16-bit copies aside: see
    estimate_peak_bytes).

    - each layer's activations, ACTIVATION_BYTES * n_embd per token; with checkpointing only each layer's fp32
      input (4 * n_embd per token) plus one layer's full set, recomputed in the backward pass;
    - the attention matrix (n_head * length^2 fp32 values per row and layer) where no fused kernel runs (MPS);
    - the head: the final LayerNorm's fp32 input, the LM head's input and log-softmax's fp32 output (the
      logits), plus 24 bytes a token: the int64 token ids the embedding and the loss keep, the LayerNorm's
      statistics.
    """
    half = precision in ("bf16", "fp16")
    tokens = rows * length
    per_layer = ACTIVATION_BYTES["half" if half else "fp32"] * n_embd * tokens
    if attention_matrix:
        per_layer += n_head * length * length * 4 * rows
    layers = (n_layer * 4 * n_embd * tokens + per_layer) if checkpointing else n_layer * per_layer
    head = tokens * (n_embd * (4 + (2 if half else 4)) + vocab * 4 + 24)
    return layers + head


def estimate_peak_bytes(n_params: int, n_trainable: int, n_layer: int, n_embd: int, n_head: int, vocab: int,
                        rows: int, length: int, precision: str, checkpointing: bool = False,
                        attention_matrix: bool = False) -> int:
    """Peak memory of one training step, from the model's and the batch's shapes: it comes as the backward
    pass starts, when everything the forward pass kept is still there and the loss's gradient is being
    computed.

    - fp32 weights, their gradients and AdamW's two moments (trainable parameters only), plus a 16-bit copy of
      the weights that autocast keeps during the step;
    - what the forward pass keeps for the backward pass (saved_bytes);
    - the logits' gradients: B x T x vocab fp32 values twice, log-softmax's incoming and outgoing gradient,
      beside its saved output. (The 16-bit gradient for the LM head comes once the first two are freed, and
      the forward's 16-bit logits and their fp32 copy, 6 bytes a value, are gone before the backward pass
      starts.)
    """
    half = precision in ("bf16", "fp16")
    static = n_params * 4 + n_trainable * (4 + 8) + (n_params * 2 if half else 0)
    saved = saved_bytes(n_layer, n_embd, n_head, vocab, rows, length, precision, checkpointing,
                        attention_matrix)
    logit_grads = rows * length * vocab * (4 + 4)
    return static + saved + logit_grads


def fit_advice(max_length: int) -> str:
    """What makes a model fit less memory, for the errors that say it does not fit."""
    return (f"lower MAX_LENGTH (now {max_length}), choose a smaller MODEL, or set LORA_R (e.g. 16) to train "
            f"adapters only")


def plan_memory(caps: Capabilities, n_params: int, n_trainable: int, config, batch_size: int, max_length: int,
                precision: str, resident_bytes: int = 0, headroom: float = 0.85) -> MemoryPlan:
    """The largest micro-batch that fits `headroom` of the memory; gradient checkpointing if none does.

    `resident_bytes`: what the model's weights already take on the device where `caps.free_bytes` was measured
    (plan_run reads the free memory after loading the model). The estimate counts the weights, so the budget
    does too: free memory plus the model's own bytes.

    Splitting a batch into micro-batches changes the numbers only by rounding (the sums run in another order):
    the loss is a sum over target tokens divided by the whole batch's count, and each row's result does not
    depend on the rows beside it (right padding, causal attention). `headroom` leaves room for the allocator's
    fragmentation and the framework's own buffers.
    """
    budget = None if caps.free_bytes is None else int((caps.free_bytes + resident_bytes) * headroom)
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
                return MemoryPlan(rows, checkpointing, peak, budget, batch_size, f"{caps.kind} ({caps.name})",
                                  precision)
    raise MedQAError(
        f"The model does not fit the {budget / GB:.1f} GB available on this {caps.kind} device ({caps.name}) "
        f"even one row at a time with gradient checkpointing (about {peak / GB:.1f} GB): "
        f"{fit_advice(max_length)}.")


def gpt2_parameters(n_layer: int, n_embd: int, vocab: int = 50257, context: int = 1024) -> int:
    """GPT-2's parameter count from its shape (the LM head shares the token embedding)."""
    return vocab * n_embd + context * n_embd + n_layer * (12 * n_embd ** 2 + 13 * n_embd) + 2 * n_embd


# GPT-2 355M (gpt2-medium) on batches of 8 x 1024 tokens: the `full` profile
FULL_SHAPE = dict(n_layer=24, n_head=16, n_embd=1024, batch_size=8, max_length=1024)


def choose_profile(caps: Capabilities) -> tuple[str, str]:
    """`full` on a CUDA GPU where gpt2-medium's training fits the free memory (its fixed part, weights,
    gradients and AdamW's moments, takes about 6 GiB, so an 8 GB card has no room left), else `cpu`; and
    why, in words."""
    if caps.kind != "cuda":
        return "cpu", f"no CUDA GPU ({caps.kind}): GPT-2 124M on 1,000 examples"
    from transformers import GPT2Config

    shape = dict(FULL_SHAPE)
    batch_size, max_length = shape.pop("batch_size"), shape.pop("max_length")
    n_params = gpt2_parameters(shape["n_layer"], shape["n_embd"])
    precision = choose_precision(caps)
    try:
        plan = plan_memory(caps, n_params, n_params, GPT2Config(**shape), batch_size, max_length, precision)
    except MedQAError:
        return "cpu", (f"{caps.name} has {caps.free_bytes / GB:.1f} GB free: too little to fine-tune "
                       f"gpt2-medium (the full profile), so GPT-2 124M (the cpu profile) trains on it")
    how = describe_passes(plan.micro_batch, plan.checkpointing, batch_size)
    return "full", f"{caps.name}: gpt2-medium fits with {how}"


# ---------------------------------------------------------------- running out of memory

def is_out_of_memory(err: BaseException) -> bool:
    """Whether an error is the device running out of memory: CUDA raises torch.OutOfMemoryError, MPS a plain
    RuntimeError whose message says so ("MPS backend out of memory ..."), and cuBLAS, when it cannot get the
    workspace for a matrix product, a RuntimeError "CUDA error: CUBLAS_STATUS_ALLOC_FAILED ..."."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError) and (
        "out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text))


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device: CUDA and MPS run it asynchronously, so a clock read without
    this counts only the queueing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def release_cached_memory(device: torch.device) -> None:
    """Hand the blocks PyTorch's allocator keeps cached back to the device, so that a smaller retry starts
    from unfragmented memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


# ---------------------------------------------------------------- copies and random state

def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device`, the one way the project does it. Asynchronous only from pinned
    memory on CUDA: from ordinary (or temporary, soon freed) memory an asynchronous copy gains nothing on
    CUDA and can read the memory after it changed on MPS."""
    return tensor.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())


def rng_state(device: torch.device) -> dict:
    """The random generators' states that training draws from (dropout, the CPU's and the device's)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    if device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what rng_state saved. A checkpoint written on a machine with more GPUs than this one
    restores the GPUs present (training draws on one)."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        for index, gpu_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)
    if device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])
