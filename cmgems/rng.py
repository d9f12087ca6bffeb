"""Random generators derived from (seed, step, rank, purpose): no global RNG state anywhere.

A resumed run rebuilds the generator of step s exactly as the uninterrupted run did, so masking
(and anything else drawn through here) is a pure function of those four values. Different
purposes ("mask", "curriculum", ...) get independent streams at the same step.
"""
from __future__ import annotations

import hashlib

import torch

_SEED_MASK = (1 << 63) - 1  # torch seeds are uint64; keep 63 bits so they also fit an int64


def derive_seed(seed: int, step: int, rank: int, purpose: str) -> int:
    """63-bit seed: BLAKE2b of the tuple, stable across processes, machines and Python versions."""
    text = f"cmgems|{int(seed)}|{int(step)}|{int(rank)}|{purpose}".encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def generator(seed: int, step: int, rank: int, purpose: str,
              device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch.Generator on `device` seeded from (seed, step, rank, purpose)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, step, rank, purpose))
    return gen
