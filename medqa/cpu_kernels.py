"""Which kernels GPT-2's linear layers answer with on a CPU (`fastest_linears`): MKL's fp32 kernels for a few
rows at a time are slow on some processors only, so a call large enough to repay it times each candidate."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from medqa.batches import EOT

# what a private oneDNN op raises on a torch other than the pinned one: no such op, no CPU kernel, bad inputs
PRIVATE_OP_ERRORS = (RuntimeError, AttributeError, NotImplementedError)


class OneDNNLinear(torch.nn.Module):
    """y = x W^T + b by oneDNN on a copy of the weight packed once, through the private ops torch.compile's
    CPU backend emits (hence the pinned torch); PyTorch's own product once either op fails."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):  # weight: (out, in)
        super().__init__()
        self.weight, self.bias = weight.detach(), None if bias is None else bias.detach()
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.contiguous())
        except PRIVATE_OP_ERRORS:
            self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == torch.float32:
            try:
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            except PRIVATE_OP_ERRORS:
                self.packed = None
        return F.linear(x, self.weight, self.bias)  # the same product up to rounding, any dtype


class BF16Linear(torch.nn.Module):
    """y = x W^T + b on a bf16 copy of the weight (fp32 in, fp32 out): for CPUs that compute bf16 natively."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = weight.detach().to(torch.bfloat16)
        self.bias = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


@contextmanager
def _swapped_linears(model, layer):
    """While inside, every linear layer of the model is `layer(weight (out, in), bias)`; its own after."""
    own = {name: m for name, m in model.named_modules()  # peft's LoRA adapters read their weights directly
           if isinstance(m, (Conv1D, torch.nn.Linear)) and "lora_" not in name}
    fast = {name: layer(m.weight.t() if isinstance(m, Conv1D) else m.weight, m.bias)  # Conv1D's: (in, out)
            for name, m in own.items()}
    try:
        for name, m in fast.items():
            model.set_submodule(name, m)
        yield model
    finally:
        for name, m in own.items():
            model.set_submodule(name, m)


def onednn_linears(model):
    """While inside, the fp32 linear layers of a model on the CPU run on oneDNN instead of MKL: the same
    arithmetic, summed in another order. Elsewhere (CUDA, bf16 weights, no oneDNN) the model is left as is."""
    onednn = "onednn" in candidate_kernels(model)
    return _swapped_linears(model, OneDNNLinear) if onednn else nullcontext(model)


KERNELS = {"default": nullcontext, "onednn": onednn_linears,
           "bf16": lambda model: _swapped_linears(model, BF16Linear)}
FORCED_KERNELS: str | None = None  # a name in KERNELS: the benchmarks time one candidate on its own
_CHOSEN: dict = {}  # (model shape, candidates, threads) -> (name, measurements)
MARGIN = 1.05  # another candidate must beat PyTorch's default by 5% to be chosen: never slower than it
PROBE_PROMPTS, PROBE_TOKENS, PROBE_ROUNDS = 4, 16, 3
PROBE_PAYBACK = 20  # a call is probed only if its work is this many times the probe's (worth_probing)


def candidate_kernels(model) -> list[str]:
    """PyTorch's default layers, and oneDNN's for fp32 weights on a CPU with oneDNN on: the same arithmetic up
    to rounding. bf16 changes answers (the notebook and medqa.ask must agree): only FORCED_KERNELS sets it."""
    p = next(model.parameters())
    on = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    fp32_cpu = p.device.type == "cpu" and p.dtype == torch.float32
    return ["default", "onednn"] if on and fp32_cpu else ["default"]


def _probe(model, kernels: str, ids, mask) -> tuple[float, list]:
    with KERNELS[kernels](model):
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=PROBE_TOKENS,
                             min_new_tokens=PROBE_TOKENS, do_sample=False, pad_token_id=EOT, eos_token_id=EOT)
        return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()


def measure_kernels(model, prompts: list[list[int]], pad) -> dict:
    """Each candidate's median seconds for a few greedy steps on the first prompts (padded by `pad`, the
    candidates interleaved) and whether its tokens equal the default's; or the error that ruled it out."""
    # whole prompts, as they will be answered; only one too long to leave room for the probe's tokens is cut
    rows = [p[-(model.config.n_positions - PROBE_TOKENS):] for p in prompts[:PROBE_PROMPTS]]
    ids, mask = pad(rows, next(model.parameters()).device)
    seconds, tokens, failed = {}, {}, {}
    for _ in range(PROBE_ROUNDS):
        for kernels in [k for k in candidate_kernels(model) if k not in failed]:
            try:
                took, tokens[kernels] = _probe(model, kernels, ids, mask)
                seconds.setdefault(kernels, []).append(took)
            except PRIVATE_OP_ERRORS as err:  # a private op this torch (or an outer autocast) does not take
                failed[kernels] = str(err).splitlines()[0][:200]
    return {k: {"seconds": statistics.median(times), "same_tokens": tokens[k] == tokens.get("default")}
            for k, times in seconds.items()} | {k: {"error": err} for k, err in failed.items()}


def choose_kernels(measured: dict) -> str:
    """The fastest candidate that beats PyTorch's default by MARGIN; bf16 only if its tokens equal fp32's."""
    bar = measured["default"]["seconds"] / MARGIN
    usable = {k: m["seconds"] for k, m in measured.items()
              if "seconds" in m and (k != "bf16" or m["same_tokens"])}
    fastest = min(usable, key=usable.get)
    return fastest if usable[fastest] < bar else "default"


def worth_probing(n_kernels: int, n_prompts: int, max_new_tokens: int) -> bool:
    """Whether a call's prompts x new tokens are PROBE_PAYBACK times the probe's: a probe could make a smaller
    call, such as a few questions to `python -m medqa.ask`, much slower than PyTorch's default."""
    probe = PROBE_ROUNDS * n_kernels * PROBE_PROMPTS * PROBE_TOKENS
    return n_prompts * max_new_tokens >= PROBE_PAYBACK * probe


def fastest_linears(model, prompts: list[list[int]], max_new_tokens: int | None = None, *, pad):
    """The context in which this model answers fastest here, measured once per model shape, process and
    thread count (a reloaded copy answers alike); a call not worth_probing answers on the default layers until
    a larger one measured (`max_new_tokens` None: whatever it costs). FORCED_KERNELS overrides it."""
    if FORCED_KERNELS is not None:
        return KERNELS[FORCED_KERNELS](model)
    candidates, key = candidate_kernels(model), _key(model)
    small = max_new_tokens is not None and not worth_probing(len(candidates), len(prompts), max_new_tokens)
    if candidates == ["default"] or (key not in _CHOSEN and small):
        return nullcontext(model)  # nothing to choose, or a probe would cost more than it can save here
    if key not in _CHOSEN:
        measured = measure_kernels(model, prompts, pad)
        _CHOSEN[key] = (choose_kernels(measured), measured)
    return KERNELS[_CHOSEN[key][0]](model)


def _key(model) -> tuple:
    c = model.config
    return (c.n_layer, c.n_embd, c.n_head, c.vocab_size, tuple(candidate_kernels(model)),
            torch.get_num_threads())


def chosen_kernels(model) -> dict | None:
    """What fastest_linears chose for this model's shape here and what it measured; None before a choice."""
    kernels, measured = _CHOSEN.get(_key(model), (None, None))
    return None if kernels is None else {"kernels": kernels, "measured": measured}
