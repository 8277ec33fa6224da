"""Epoch samplers: the order of training examples, from (seed, epoch) alone.

Every order a run draws comes from `epoch_generator(seed, epoch)`, never from the global RNG, so a
run resumed mid-epoch sees the same order as the uninterrupted one, and every process of a
multi-process run draws the same order (Accelerate then shards it).

    EpochSampler          a fresh permutation each epoch (plain batches of batch_size examples)
    EpochBatches          base of the batch samplers below: batches cut from the epoch's permutation
    TokenBudgetBatches    micro-batches filled to a number of tokens (packed runs, train.token_budget)
    LengthGroupedBatches  batches of similar lengths (unpacked runs, train.group_by_length)

`flantune.packing.ShapeBatches` (micro-batches that fill one fixed packed shape, for CUDA graphs)
is an `EpochBatches` too; it lives beside the packer whose rows it must predict.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler):
    """A fresh permutation each epoch, from (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random source of one epoch's order: from (seed, epoch) alone, so a resumed run that
    starts mid-epoch sees the same order as the uninterrupted one."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


class EpochBatches(Sampler):
    """A batch sampler whose batches come from the epoch's permutation (`epoch_generator`), made
    once per epoch (len() is asked at every logged step). Subclasses say how in `_make`."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self._made: tuple[int, list[list[int]]] | None = None  # (epoch, its batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        if self._made is None or self._made[0] != self.epoch:
            g = epoch_generator(self.seed, self.epoch)
            self._made = (self.epoch, self._make(torch.randperm(self.n, generator=g).tolist(), g))
        return self._made[1]

    def _make(self, order: list[int], g: torch.Generator) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class TokenBudgetBatches(EpochBatches):
    """Micro-batches of example indices whose source + target tokens stay within `budget`, in the
    epoch's order; an example longer than the budget forms a batch alone."""

    def __init__(self, lengths: list[int], budget: int, seed: int):
        super().__init__(len(lengths), seed)
        self.lengths, self.budget = lengths, budget

    def _make(self, order: list[int], g: torch.Generator) -> list[list[int]]:
        out, current, used = [], [], 0
        for i in order:
            if current and used + self.lengths[i] > self.budget:
                out.append(current)
                current, used = [], 0
            current.append(i)
            used += self.lengths[i]
        if current:
            out.append(current)
        return out


class LengthGroupedBatches(EpochBatches):
    """Batches of similar lengths for unpacked runs (`train.group_by_length`), as transformers'
    `group_by_length`: the epoch's permutation is cut into megabatches of 50 batches, each sorted
    by length and cut into batches; the batches then come in random order, the one holding the
    longest example first (a run that does not fit in memory fails at its first step, not hours in)."""

    MEGA = 50

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = lengths, batch_size

    def _make(self, order: list[int], g: torch.Generator) -> list[list[int]]:
        mega = self.batch_size * self.MEGA
        out = []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            out += [group[s : s + self.batch_size] for s in range(0, len(group), self.batch_size)]
        out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        longest = max(range(len(out)), key=lambda b: max(self.lengths[i] for i in out[b]))
        out.insert(0, out.pop(longest))
        return out
