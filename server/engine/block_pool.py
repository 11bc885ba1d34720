"""The KV cache's blocks: who uses which, which hold a reusable prefix, which are free (pure Python).

The cache is split into fixed-size blocks of `block_size` token positions; a sequence owns a *block
table* (its blocks in position order), gets blocks as it grows, and returns them when it ends.

Prefix caching: a block whose positions are all written gets a *block hash* that names everything
its contents depend on: the previous block's hash (so the whole prefix), the adapter version (its
identity: a content digest, so a re-uploaded adapter id never reuses the old version's KV), the
tenant (a hit is visible as speed, so one tenant must not learn what another sent), and the block's
tokens. A later sequence whose prompt starts with the same blocks shares them (refcounted) instead of
computing them again. A released block with a hash stays cached, evictable in LRU order when a
block is needed; one without is free at once.

Block 0 is the *null block*: never handed out and always zero. Attention pads its reads with it
(a masked position still enters the arithmetic, and a -inf score times a NaN value is NaN), and
every block is zeroed before it is handed to a new sequence, so nothing one sequence wrote can reach
another except through a shared prefix, which is by construction exactly what it would compute.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence as Tokens
from dataclasses import dataclass

NULL_BLOCK = 0


def block_hash(previous: bytes, tenant: str, version: str | None, tokens: Tokens[int]) -> bytes:
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(f"{tenant}\0{version or ''}\0".encode())
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return h.digest()


@dataclass(slots=True)
class PrefixCacheCounts:
    """Prompt tokens looked up in the prefix cache and found there (read at /metrics scrape time)."""

    queried_tokens: int = 0
    hit_tokens: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least two blocks (one is the null block)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first
        self._to_zero: list[int] = []
        self.counts = PrefixCacheCounts()

    @property
    def num_available(self) -> int:
        """Blocks that can be handed out now (free, or cached and unreferenced)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by running sequences."""
        return self.num_blocks - 1 - self.num_available

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self) -> int | None:
        """A zeroed block for one sequence, or None when every block is in use."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        else:
            return None
        self._refs[block] = 1
        self._to_zero.append(block)
        return block

    def release(self, blocks: list[int], discard: bool = False) -> None:
        """A sequence is done with these blocks (in position order: the prefix is evicted last).
        `discard`: its output went wrong (non-finite), so none of its blocks stays in the prefix
        cache, and the unshared ones are zeroed at once rather than when next handed out."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if discard and block in self._hash_of:
                del self._by_hash[self._hash_of.pop(block)]
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
                    if discard:
                        self._to_zero.append(block)

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest cached run of `hashes` (a prompt's full blocks, in order), each
        now shared by the caller."""
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def note_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.counts.queried_tokens += queried_tokens
        self.counts.hit_tokens += hit_tokens

    def register(self, block: int, h: bytes) -> None:
        """`block` is full and its contents are named by `h`: later prompts may share it. A hash
        already cached (the same prefix computed twice at once) keeps its first block."""
        if h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h

    def take_to_zero(self) -> list[int]:
        """Blocks handed out since the last call: the runner zeroes them before the next forward."""
        blocks, self._to_zero = self._to_zero, []
        return blocks
