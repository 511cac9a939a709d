"""Tolerances that follow from float32's arithmetic, for the tests that compare numbers two ways compute.

Two ways that do the same float32 arithmetic in another order (another kernel, a CPU with other vector
widths, a batch cut into micro-batches) differ only by rounding, and rounding grows with the length of the
longest sum behind a number. A float32 operation rounds by at most u = 2^-24 relative. A sum of n terms
carries at most about n·u in the worst case; rounding errors of independent signs add up like a random walk,
so in practice a sum's error stays within a small multiple of sqrt(n)·u relative to the sum of its terms'
magnitudes (Higham and Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci. Comput.
41(5), 2019). A bound of sqrt(n)·u with the n of the longest sum is thus what float32 allows, on any CPU;
a defect (a row counted twice, the wrong divisor, a dropped term) moves numbers by far more.

Comparisons are normwise (the norm of the difference against the norm of the reference): an element that
cancels to near zero can differ by 100% of itself and still be rounding.
"""

from __future__ import annotations

import math

import torch

U = 2.0 ** -24  # float32's unit roundoff


def sum_bound(n: int) -> float:
    """Relative rounding error that float32 allows a sum of `n` terms: sqrt(n)·u."""
    return math.sqrt(n) * U


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖, in float64."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny))


def network_bound(config) -> float:
    """Relative rounding error that float32 allows GPT-2's logits (normwise), one way against exact.

    The logits come out of 4 * n_layer + 1 matrix products in sequence (attention's two, the MLP's two per
    layer; the head), each rounding its output by at most sum_bound of its inner length (the longest: the
    MLP's 4 * n_embd); LayerNorm keeps the scale, and the residual stream adds the errors up rather than
    multiplying them. Elementwise steps (GELU, softmax over the few positions here) round by a few u each,
    below one product's share."""
    return (4 * config.n_layer + 1) * sum_bound(4 * config.n_embd)
