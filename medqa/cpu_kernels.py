"""Which matrix-product kernels GPT-2's linear layers answer with on the CPU: `fastest_linears`. MKL's fp32
kernels for a few rows at a time (one new token per prompt) are slow on some processors and not on others, so
the first call large enough to repay it times a few greedy steps of each candidate (candidate_kernels) here
and keeps the fastest for the model's shape (benchmarks/bench.py reports the figures, with the CPU's name)."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

from medqa.batches import EOT

# What a private oneDNN op may raise where torch is not the pinned version: AttributeError (an op this build
# lacks), NotImplementedError (no CPU kernel), RuntimeError ("could not create a primitive descriptor").
PRIVATE_OP_ERRORS = (RuntimeError, AttributeError, NotImplementedError)


class OneDNNLinear(torch.nn.Module):
    """y = x W^T + b computed by oneDNN on its own copy of the weight, packed once in its blocked layout, with
    the private ops torch.compile's CPU backend emits for linear layers (hence the pinned torch). Where either
    op fails (PRIVATE_OP_ERRORS), the layer is PyTorch's own from then on."""

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
            except PRIVATE_OP_ERRORS:  # private ops, no promises: PyTorch's layer from now on
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
    """While inside, every linear layer of the model is `layer(weight (out, in), bias)`; the model's own
    layers come back on exit, error or not."""
    swaps = []
    for name, parent in model.named_modules():
        if "lora_" in name:  # peft's LoRA adapters: their layer reads their weights directly; they are small
            continue
        for child_name, child in parent.named_children():
            if isinstance(child, Conv1D):  # GPT-2 keeps these weights as (in, out)
                swaps.append((parent, child_name, child, layer(child.weight.t(), child.bias)))
            elif isinstance(child, torch.nn.Linear):
                swaps.append((parent, child_name, child, layer(child.weight, child.bias)))
    try:
        for parent, child_name, _, fast in swaps:
            setattr(parent, child_name, fast)
        yield model
    finally:
        for parent, child_name, child, _ in swaps:
            setattr(parent, child_name, child)


def _onednn_applies(model) -> bool:
    """fp32 weights on the CPU, and oneDNN there and on."""
    p = next(model.parameters())
    on = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    return on and p.device.type == "cpu" and p.dtype == torch.float32


@contextmanager
def onednn_linears(model):
    """While inside, the fp32 linear layers of a model on the CPU run on oneDNN instead of MKL: the same fp32
    arithmetic, its sums in another order (tests/test_speed.py bounds the difference by float32's rounding),
    on a packed copy of the layers' weights held only while inside. Elsewhere (CUDA, bf16 weights, oneDNN off
    or absent) the model is left as is."""
    if not _onednn_applies(model):
        yield model
        return
    with _swapped_linears(model, OneDNNLinear):
        yield model


def bf16_linears(model):
    """While inside, every linear layer computes on a bf16 copy of its weights."""
    return _swapped_linears(model, BF16Linear)


# ---------------------------------------------------------------- which kernels answer fastest here

KERNELS = {"default": nullcontext, "onednn": onednn_linears, "bf16": bf16_linears}
FORCED_KERNELS: str | None = None  # a name in KERNELS: the benchmarks time one candidate on its own
_CHOSEN: dict = {}  # (model shape, candidates, threads) -> (name, measurements)
MARGIN = 1.05  # another candidate must beat PyTorch's default by 5% to be chosen: never slower than it
PROBE_PROMPTS, PROBE_TOKENS, PROBE_ROUNDS = 4, 16, 3
PROBE_PAYBACK = 20  # a call is probed only if its work is this many times the probe's (worth_probing)


def candidate_kernels(model) -> list[str]:
    """The kernels fastest_linears may choose between: PyTorch's default fp32 layers always, and oneDNN's fp32
    layers where oneDNN is on. Both do the same fp32 arithmetic up to rounding, which can flip a greedy choice
    only where two tokens are nearly tied (benchmarks/bench.py counts identical answers). bf16 copies of the
    weights change answers, and a notebook and a later `python -m medqa.ask` should give the same text: only
    FORCED_KERNELS (the benchmarks) selects them."""
    return ["default", "onednn"] if _onednn_applies(model) else ["default"]


def _probe(model, kernels: str, ids, mask) -> tuple[float, list]:
    with KERNELS[kernels](model):
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=PROBE_TOKENS,
                             min_new_tokens=PROBE_TOKENS, do_sample=False, pad_token_id=EOT, eos_token_id=EOT)
        return time.perf_counter() - t, out[:, ids.shape[1]:].tolist()


def measure_kernels(model, prompts: list[list[int]], pad) -> dict:
    """A few greedy decoding steps of every candidate on the model and the first of the prompts it is about to
    answer, padded by `pad(rows, device) -> (ids, mask)` as they will be, interleaved (A B A B ...) so that a
    busy moment hurts every candidate alike: each one's median seconds and whether its tokens equal the
    default's, or the error that ruled it out."""
    # whole prompts, as they will be answered; only one too long to leave room for the probe's tokens is cut
    rows = [p[-(model.config.n_positions - PROBE_TOKENS):] for p in prompts[:PROBE_PROMPTS]]
    ids, mask = pad(rows, next(model.parameters()).device)
    seconds, tokens, failed = {}, {}, {}
    for _ in range(PROBE_ROUNDS):
        for kernels in [k for k in candidate_kernels(model) if k not in failed]:
            try:
                took, tokens[kernels] = _probe(model, kernels, ids, mask)
            except PRIVATE_OP_ERRORS as err:  # a private op this torch (or an outer autocast) does not take
                failed[kernels] = str(err).splitlines()[0][:200]
                continue
            seconds.setdefault(kernels, []).append(took)
    return {k: {"seconds": statistics.median(times), "same_tokens": tokens[k] == tokens.get("default")}
            for k, times in seconds.items()} | {k: {"error": err} for k, err in failed.items()}


def choose_kernels(measured: dict) -> str:
    """The fastest candidate that beats PyTorch's default by MARGIN; bf16 only if its greedy tokens in the
    probe equal fp32's too (where two tokens are nearly tied, bf16's rounding may pick the other one)."""
    best, best_s = "default", measured["default"]["seconds"] / MARGIN
    for kernels, m in measured.items():
        ok = "seconds" in m and (kernels != "bf16" or m["same_tokens"])
        if ok and m["seconds"] < best_s:
            best, best_s = kernels, m["seconds"]
    return best


def worth_probing(n_kernels: int, n_prompts: int, max_new_tokens: int) -> bool:
    """Whether a call of `n_prompts` answers of up to `max_new_tokens` is large enough to pay for a probe:
    its prompts x new tokens against PROBE_PAYBACK times the probe's (on few rows a step, where a call decodes
    whole batches). Smaller calls, such as a few questions to `python -m medqa.ask` in a fresh process, answer
    on the default layers: a probe could make them much slower than PyTorch's default."""
    probe = PROBE_ROUNDS * n_kernels * PROBE_PROMPTS * PROBE_TOKENS
    return n_prompts * max_new_tokens >= PROBE_PAYBACK * probe


def fastest_linears(model, prompts: list[list[int]], max_new_tokens: int | None = None, *, pad):
    """The context in which this model answers fastest here: measured once per model shape, process and thread
    count (measure_kernels), then reused, so that a reloaded copy answers the same way. A call too small to
    repay the probe (worth_probing) answers on the default layers until a larger one has measured;
    `max_new_tokens` None asks for the choice whatever it costs. FORCED_KERNELS overrides the choice."""
    if FORCED_KERNELS is not None:
        return KERNELS[FORCED_KERNELS](model)
    candidates = candidate_kernels(model)
    small = max_new_tokens is not None and not worth_probing(len(candidates), len(prompts), max_new_tokens)
    if candidates == ["default"] or (_key(model) not in _CHOSEN and small):
        return nullcontext(model)  # nothing to choose, or a probe would cost more than it can save here
    if _key(model) not in _CHOSEN:
        measured = measure_kernels(model, prompts, pad)
        _CHOSEN[_key(model)] = (choose_kernels(measured), measured)
    return KERNELS[_CHOSEN[_key(model)][0]](model)


def _key(model) -> tuple:
    c = model.config
    return (c.n_layer, c.n_embd, c.n_head, c.vocab_size, tuple(candidate_kernels(model)),
            torch.get_num_threads())


def chosen_kernels(model) -> dict | None:
    """What fastest_linears chose for this model's shape here and what it measured (None: nothing to choose or
    not yet answered), for the notebook's metrics.json and the benchmarks."""
    kernels, measured = _CHOSEN.get(_key(model), (None, None))
    return None if kernels is None else {"kernels": kernels, "measured": measured}
