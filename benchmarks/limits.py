"""What the machine can do at most, measured in the process that times the ways, and what each way's work is,
counted from the model's shape: so that a figure can say how close a way comes to the limit.

- Matrix-product peak: the best of several 2048 x 2048 products in the precision a way computes in (fp32:
  MKL's kernels; bf16: oneDNN's), on the threads the ways use. It is the practical peak of this machine's
  kernels, not the datasheet's.
- Memory bandwidth: the best of several copies of a tensor far larger than the caches (read + write bytes).
- FLOPs, counted as PaLM's appendix B counts them (Chowdhery et al., 2022): the matrix products only, each
  token multiplied by the layers' weights (12 * n_layer * n_embd^2: attention's four projections, the MLP's
  two) and by the output head's (n_embd * vocab), and attention's scores and weighted sum over the positions
  the pass holds, causal masking not subtracted (the embedding lookups multiply nothing):
  - training, per token of a row of T tokens, forward and backward: 6 * N + 12 * n_layer * n_embd * T, N the
    layers' and the head's weights together;
  - answering, forward only: the prompt's p tokens in one pass, p * (2 * N_layers + 4 * n_layer * n_embd * p),
    with the head for its last position only (2 * n_embd * vocab), then one pass per further new token at
    position t: 2 * N + 4 * n_layer * n_embd * t. Work a way does beyond that (the textbook recomputes the
    whole sequence for every token; padding) is wasted and not counted.
  tests/test_benchmarks.py checks both counts against torch.utils.flop_counter on a small GPT-2.
- Memory bound for answering: every forward pass reads all the weights once, for all the rows it decodes, so
  (passes x weight bytes) / seconds against the copy bandwidth says how close a way comes to that bound.
"""

from __future__ import annotations

import time

import torch

PEAK_SIZE, PEAK_REPEATS = 2048, 6
COPY_BYTES, COPY_REPEATS = 1 << 30, 5


def matmul_peak(dtype: torch.dtype, size: int = PEAK_SIZE, repeats: int = PEAK_REPEATS) -> float:
    """FLOP/s of the best of `repeats` size x size matrix products in `dtype`."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(dtype) for _ in range(2))
    a @ b  # warm-up: thread pool, kernel choice
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * size ** 3 / best


def copy_bandwidth(nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float:
    """Bytes/s read and written by the best of `repeats` copies of an `nbytes` tensor."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def layer_weights(config) -> int:
    """The weights in the layers that multiply each token: attention's four projections and the MLP's two."""
    return 12 * config.n_layer * config.n_embd ** 2


def matmul_weights(config) -> int:
    """N: the weights that multiply each token, the layers' and the output head's."""
    return layer_weights(config) + config.n_embd * config.vocab_size


def training_flops(config, lengths) -> int:
    """FLOPs of a training step (forward and backward) over rows of these lengths."""
    n, attention = matmul_weights(config), 12 * config.n_layer * config.n_embd
    return sum(t * (6 * n + attention * t) for t in lengths)


def answer_flops(config, prompt_lengths, new_tokens) -> int:
    """FLOPs of the forward passes that give each prompt its new tokens, with a KV cache: the useful work."""
    layers, head = layer_weights(config), config.n_embd * config.vocab_size
    attention = 4 * config.n_layer * config.n_embd
    rows = [(p, k) for p, k in zip(prompt_lengths, new_tokens) if k]
    prompts = sum(p * (2 * layers + attention * p) + 2 * head for p, _ in rows)
    steps = sum(2 * (layers + head) + attention * (p + j)
                for p, k in rows for j in range(1, k))
    return prompts + steps


def peaks(dtypes) -> dict:
    """The matmul peak in each of `dtypes` (names: "fp32", "bf16") and the copy bandwidth, in this process."""
    out = {f"matmul_{name}_flops": matmul_peak({"fp32": torch.float32, "bf16": torch.bfloat16}[name])
           for name in dtypes}
    return out | {"copy_bytes_per_s": copy_bandwidth()}
