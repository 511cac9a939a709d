"""Step 8 and 11: answers from the model, many prompts at a time, with `model.generate` and its KV cache."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.pytorch_utils import Conv1D

from medqa.batches import EOT


class OneDNNLinear(torch.nn.Module):
    """y = x W^T + b computed by oneDNN, on its own copy of the weight, packed once in oneDNN's blocked layout.

    The two ops are those torch.compile's CPU backend emits for linear layers; they are internal to PyTorch (hence
    the underscores and the pinned torch), and tests/test_speed.py checks that this layer computes what the model's
    own layers do.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):  # weight: (out, in)
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


@contextmanager
def onednn_linears(model):
    """While inside, the fp32 linear layers of a model on the CPU run on oneDNN instead of MKL.

    PyTorch sends fp32 matrix products on the CPU to MKL, whose kernels for a few rows at a time (one new token per
    prompt) are slow on some processors. oneDNN computes the same fp32 products (float noise apart); on the AMD EPYC
    this was built on, GPT-2 124M answers 8 prompts 1.9x and 32 prompts 1.4x faster with it (`benchmarks/bench.py`,
    same answers). The packed weights are a copy (about 0.5 GB more memory while answering there), held only while
    inside; the original layers come back on exit, error or not.
    Elsewhere (CUDA, bf16 weights, no oneDNN, or `torch.backends.mkldnn.enabled = False`) the model is left as is.
    """
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not (torch.backends.mkldnn.is_available()
                                                                   and torch.backends.mkldnn.enabled):
        yield model
        return
    swaps = []
    for path, parent in model.named_modules():
        if "lora_" in path:  # peft's LoRA adapters: their layer reads their weights directly, and they are small
            continue
        for name, child in parent.named_children():
            if isinstance(child, Conv1D):  # GPT-2 keeps these weights as (in, out)
                swaps.append((parent, name, child, OneDNNLinear(child.weight.t(), child.bias)))
            elif isinstance(child, torch.nn.Linear):
                swaps.append((parent, name, child, OneDNNLinear(child.weight, child.bias)))
    try:
        for parent, name, _, fast in swaps:
            setattr(parent, name, fast)
        yield model
    finally:
        for parent, name, child, _ in swaps:
            setattr(parent, name, child)


def _left_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every prompt's last token in the last column, where generation continues."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), EOT, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def cut_answer(new_ids: list[int]) -> list[int]:
    """The answer is everything generated before the first end-of-text."""
    return new_ids[: new_ids.index(EOT)] if EOT in new_ids else new_ids


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 32,
                 temperature: float = 0.0, repetition_penalty: float = 1.0, seed: int = 0) -> list[list[int]]:
    """New token ids for each prompt, in the prompts' order; greedy when temperature is 0.

    Prompts are batched by length so that little padding is computed; on the CPU the linear layers run on oneDNN.
    """
    was_training = model.training  # answers between epochs must not switch dropout off for the rest of training
    model.eval()
    device = next(model.parameters()).device
    context = model.config.n_positions
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    if temperature > 0:
        torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    try:
        with onednn_linears(model):
            for s in range(0, len(order), batch_size):
                chunk = order[s: s + batch_size]
                rows = [prompts[i][-(context - 1):] for i in chunk]  # a prompt never fills the whole context
                ids, mask = _left_pad(rows, device)
                room = min(max_new_tokens, context - ids.shape[1])
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=room, eos_token_id=EOT,
                                     pad_token_id=EOT, repetition_penalty=repetition_penalty, **sampling)
                for i, row in zip(chunk, gen[:, ids.shape[1]:].tolist()):
                    out[i] = cut_answer(row)
    finally:  # an interrupted answer must not leave dropout off either
        model.train(was_training)
    return out


def answer(model, tokenizer, prompts: list[list[int]], s) -> list[str]:
    """Decoded answers for tokenized prompts, with the generation settings of `s`."""
    ids = generate_ids(model, prompts, s.MAX_NEW_TOKENS, s.GEN_BATCH_SIZE, s.TEMPERATURE,
                       s.REPETITION_PENALTY, s.SEED)
    return [tokenizer.decode(r).strip() for r in ids]


def response_records(frame, answers: list[str]) -> list[dict]:
    """What test_responses.json holds: each test example beside the model's answer."""
    return [{"instruction": r.instruction, "input": r.input, "output": r.output, "model_response": a}
            for r, a in zip(frame.itertuples(index=False), answers, strict=True)]
