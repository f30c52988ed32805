"""Seeds of the data streams: one independent stream per (run seed, epoch, ...) key."""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(value: int) -> int:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of 64-bit integers whose outputs for
    nearby inputs look independent."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers, e.g. (run seed, epoch) or (run seed, epoch, stream).

    Each value goes through the finaliser before it is combined, so keys that differ anywhere give
    unrelated seeds (an additive or xor-shift mix lets, e.g., (seed 0, epoch 0) and (seed 1, epoch
    65) collide: two seeds of a sweep would then share an epoch's order and augmentation)."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ _splitmix64(int(value) & _MASK64))
    return state & 0x7FFFFFFFFFFFFFFF
