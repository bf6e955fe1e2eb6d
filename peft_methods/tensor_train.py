"""Tensor-train (TT) matrices, the building block of LoRETTA.

Takes an input width, an output width, a list of tensor modes whose product is in*out (the authors' hand-chosen
shapes, or `auto_modes`) and a TT rank; gives a module mapping (..., in) to (..., out). As in the LoRETTA
reference code, the (in, out) weight is the row-major reshape of a tensor train over the modes, so the first modes
index the input and the last ones the output. When those modes meet at a mode boundary (or one mode splits across
it), the input is contracted core by core and the dense weight is never built; that path is taken whenever it
costs fewer multiply-adds than rebuilding the weight. Under `torch.no_grad` (inference) the dense weight is built
once and reused until a core changes.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn


def factorize(n: int, n_factors: int) -> list[int]:
    """`n` as a product of `n_factors` near-equal integers, largest first (1s pad when n has few prime factors)."""
    if n < 1 or n_factors < 1:
        raise ValueError(f"cannot factorise {n} into {n_factors} factors: both must be >= 1")
    factors = [1] * n_factors
    for p in sorted(_primes(n), reverse=True):  # largest primes first keeps the greedy split balanced
        i = factors.index(min(factors))
        factors[i] *= p
    return sorted(factors, reverse=True)


def _primes(n: int) -> list[int]:
    primes, rest, d = [], n, 2
    while d * d <= rest:
        while rest % d == 0:
            primes.append(d)
            rest //= d
        d += 1
    if rest > 1:
        primes.append(rest)
    return primes


def auto_modes(n: int, max_mode: int = 16) -> list[int]:
    """The fewest near-equal factors of `n` that are all <= `max_mode` (a prime above it stays one mode).

    4096 -> [16, 16, 16], 576 -> [12, 8, 6], 64 -> [8, 8], 8 -> [8]: the authors' shapes use modes of 4-16.
    """
    primes = _primes(n)
    for k in range(1, max(1, len(primes)) + 1):
        factors = [f for f in factorize(n, k) if f > 1] or [1]
        if max(factors) <= max_mode:
            return factors
    return sorted(primes, reverse=True)


def _split_modes(modes: Sequence[int], in_dim: int) -> Optional[list[tuple[int, int]]]:
    """(input factor, output factor) per mode, or None when the row/column boundary does not fall on the modes.

    The rows of the reshaped tensor are the leading modes; one mode may straddle the boundary (a * b with a on the
    input side), e.g. modes [16, 16, 8, 4, 4] for a (4096, 8) matrix give [(16,1), (16,1), (8,1), (2,2), (1,4)].
    """
    out, prod = [], 1
    for n in modes:
        if in_dim % (prod * n) == 0:
            out.append((n, 1))
            prod *= n
            continue
        a = in_dim // prod
        if n % a:
            return None
        out.append((a, n // a))
        prod = in_dim
    return out if prod == in_dim else None


class TTMatrix(nn.Module):
    """A (in_dim, out_dim) matrix: the row-major reshape of a TT over `modes`, cores G_k of shape (r_{k-1}, n_k, r_k).

    With `zero_last=True` the last core starts at zero, so the matrix (and any update it produces) starts at zero
    while the other cores still receive gradient through it.
    """

    def __init__(self, in_dim: int, out_dim: int, modes: Sequence[int], rank: int, zero_last: bool = False):
        super().__init__()
        modes = [int(m) for m in modes]
        if math.prod(modes) != in_dim * out_dim or min(modes) < 1:
            raise ValueError(f"tensor modes {modes} multiply to {math.prod(modes)}, but a ({in_dim}, {out_dim}) "
                             f"matrix needs {in_dim * out_dim}")
        self.in_dim, self.out_dim, self.modes = in_dim, out_dim, modes
        self.ranks = [1] + [rank] * (len(modes) - 1) + [1]
        self.split = _split_modes(modes, in_dim)
        # Each core's std is chosen so the contracted matrix has entries of variance ~1/in_dim (Kaiming-like).
        d = len(modes)
        std = (1.0 / (in_dim * rank ** (d - 1))) ** (1.0 / (2 * d))
        self.cores = nn.ParameterList()
        for k, n in enumerate(modes):
            shape = (self.ranks[k], n, self.ranks[k + 1])
            core = torch.zeros(shape) if zero_last and k == d - 1 else torch.randn(shape) * std
            self.cores.append(nn.Parameter(core))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def dense(self) -> torch.Tensor:
        """Contract the train into the full (in_dim, out_dim) matrix."""
        full = self.cores[0].reshape(self.modes[0], self.ranks[1])  # (n_1, r_1)
        for core in self.cores[1:]:
            full = (full @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[2])  # (n_1..n_k, r_k)
        return full.reshape(self.in_dim, self.out_dim)

    def _dense_cost(self) -> int:
        cost, rows = 0, self.modes[0]
        for k in range(1, len(self.modes)):
            cost += rows * self.ranks[k] * self.modes[k] * self.ranks[k + 1]
            rows *= self.modes[k]
        return cost

    def _stream_cost(self, tokens: int) -> int:
        cost, outs, ins = 0, 1, self.in_dim
        for k, (a, b) in enumerate(self.split):
            ins //= a
            cost += tokens * outs * ins * self.ranks[k] * a * b * self.ranks[k + 1]
            outs *= b
        return cost

    def _contract(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, out), core by core: state (N, outputs so far, r_k, inputs left)."""
        N = x.shape[0]
        state = x.reshape(N, 1, 1, self.in_dim)
        for k, (a, b) in enumerate(self.split):
            core = self.cores[k].to(x.dtype).reshape(self.ranks[k], a, b, self.ranks[k + 1])
            done, r, left = state.shape[1], state.shape[2], state.shape[3] // a
            state = state.reshape(N, done, r, a, left)
            state = torch.einsum("norax,rabs->nobsx", state, core)  # (N, done, b, r_{k+1}, left)
            state = state.reshape(N, done * b, self.ranks[k + 1], left)
        return state.reshape(N, self.out_dim)

    def _cached_dense(self) -> torch.Tensor:
        key = tuple((c._version, c.data_ptr(), c.dtype, c.device) for c in self.cores)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.dense())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if not torch.is_grad_enabled():
            return x @ self._cached_dense().to(x.dtype)
        self._cache = None
        flat = x.reshape(-1, self.in_dim)
        if self.split is not None and self._stream_cost(flat.shape[0]) < \
                self._dense_cost() + flat.shape[0] * self.in_dim * self.out_dim:
            return self._contract(flat).reshape(*x.shape[:-1], self.out_dim)
        return x @ self.dense().to(x.dtype)

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_cache": None}

    def extra_repr(self) -> str:
        return f"in={self.in_dim}, out={self.out_dim}, modes={self.modes}, ranks={self.ranks}"


def tt_parameter_count(modes: Sequence[int], rank: int) -> int:
    ranks = [1] + [rank] * (len(modes) - 1) + [1]
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(modes))
