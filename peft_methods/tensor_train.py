"""Tensor-train (TT) matrices, the building block of LoRETTA.

Takes an input width, an output width, a TT rank and a number of cores; gives a module mapping (..., in) to
(..., out) whose weight is the contraction of small cores. Any width works: each is split into near-equal factors
from its prime factorisation (a prime width simply gets one large factor).
"""
from __future__ import annotations

import torch
from torch import nn


def factorize(n: int, n_factors: int) -> list[int]:
    """`n` as a product of `n_factors` near-equal integers, largest first (1s pad when n has few prime factors)."""
    if n < 1 or n_factors < 1:
        raise ValueError(f"cannot factorise {n} into {n_factors} factors: both must be >= 1")
    primes, rest, d = [], n, 2
    while d * d <= rest:
        while rest % d == 0:
            primes.append(d)
            rest //= d
        d += 1
    if rest > 1:
        primes.append(rest)
    factors = [1] * n_factors
    for p in sorted(primes, reverse=True):  # largest primes first keeps the greedy split balanced
        i = factors.index(min(factors))
        factors[i] *= p
    return sorted(factors, reverse=True)


class TTMatrix(nn.Module):
    """A (in_dim, out_dim) matrix stored as cores G_k of shape (r_{k-1}, in_k, out_k, r_k), r_0 = r_d = 1.

    With `zero_last=True` the last core starts at zero, so the matrix (and any update it produces) starts at zero
    while the other cores still receive gradient through it.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, n_cores: int, zero_last: bool = False):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.in_factors, self.out_factors = factorize(in_dim, n_cores), factorize(out_dim, n_cores)
        self.ranks = [1] + [rank] * (n_cores - 1) + [1]
        # Each core's std is chosen so the contracted matrix has entries of variance ~1/in_dim (Kaiming-like).
        std = (1.0 / (in_dim * rank ** (n_cores - 1))) ** (1.0 / (2 * n_cores))
        self.cores = nn.ParameterList()
        for k in range(n_cores):
            shape = (self.ranks[k], self.in_factors[k], self.out_factors[k], self.ranks[k + 1])
            core = torch.zeros(shape) if zero_last and k == n_cores - 1 else torch.randn(shape) * std
            self.cores.append(nn.Parameter(core))

    def dense(self) -> torch.Tensor:
        """Contract the train into the full (in_dim, out_dim) matrix; row index = (i_1..i_d) in row-major order."""
        first = self.cores[0]
        full = first.reshape(first.shape[1], first.shape[2], first.shape[3])  # (I, O, r)
        for core in self.cores[1:]:
            rows, cols = full.shape[0] * core.shape[1], full.shape[1] * core.shape[2]
            full = torch.einsum("abr,rcds->acbds", full, core).reshape(rows, cols, core.shape[3])
        return full.reshape(self.in_dim, self.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dense contraction is cheap at these sizes (in*out <= a few million) and keeps one matmul per call.
        return x @ self.dense().to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_factors}, out={self.out_factors}, ranks={self.ranks}"


def tt_parameter_count(in_dim: int, out_dim: int, rank: int, n_cores: int) -> int:
    ins, outs = factorize(in_dim, n_cores), factorize(out_dim, n_cores)
    ranks = [1] + [rank] * (n_cores - 1) + [1]
    return sum(ranks[k] * ins[k] * outs[k] * ranks[k + 1] for k in range(n_cores))

