"""The host store of top-k attention: every middle block's keys, values and summary.

docs/topk-contract.md, "What the device pool and the host store hold". A block
leaves the KV pool the moment it falls out of the window (kv_cache.py); with
topk_blocks > 0 its keys and values are copied here first: in fact as soon as
the block is complete, since that is the last moment the worker certainly
still owns it (a freed block may be written by another sequence in the very
step that frees it). Kept per (request, layer), indexed by block number.

The summary of a block is Quest's: per KV head and channel, the minimum and
maximum of its keys rotated back to position 0 (float32), kept as one matrix
per KV head (`bounds`) so that scoring every block is one matmul. The global
blocks are stored too (a few blocks, never selected): decode reads every key
past its window from here, rotated back to position 0, so one rotation per row
and step serves them all (of the query: topk_attention.attend_decode; or of
those keys to i - C: topk_in_pool). The store lives in host memory; the
interface (put, bounds, keys_at_zero, gather_far, head_rows, block_heads, drop) is what a
disk or LMCache tier would implement. No vLLM import.
"""

from dataclasses import dataclass

import torch

from lminf_vllm.kv_layout import block_head_numbers


@dataclass
class _Entry:
    keys: torch.Tensor  # [capacity, Hkv, B, D] in the cache dtype, rotated at their true positions
    # [capacity, Hkv, B, D + Dv] in the cache dtype: per row, the key rotated back to position 0, then
    # the value. Head-major, so a head's slice of a block is one contiguous piece, as in the pool
    pairs: torch.Tensor
    bounds: torch.Tensor  # [Hkv, 2 D, capacity] float32: hi then lo, a column per block
    blocks: int = 0  # blocks [first put, blocks) are valid (zeros before the first put)

    @property
    def at_zero(self) -> torch.Tensor:  # [capacity, Hkv, B, D]
        return self.pairs[..., : self.keys.shape[-1]]

    @property
    def values(self) -> torch.Tensor:  # [capacity, Hkv, B, Dv]
        return self.pairs[..., self.keys.shape[-1] :]


class HostStore:
    """Middle blocks off the KV pool, per (request, layer); a layer is any int key (its cache's address)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._entries: dict[tuple[str, int], _Entry] = {}
        self._nbytes = 0  # capacity held, kept as entries grow and go (read every step for /metrics)

    def put(self, request: str, layer: int, first_block: int, keys, values, lo, hi, keys_at_zero=None) -> None:
        """Blocks [first_block, first_block + n): keys/values [n, B, Hkv, D], lo/hi [n, Hkv, D];
        keys_at_zero [n, B, Hkv, D] (the keys rotated back to position 0: scored at distance C
        with no rotation per step; zeros when not given).

        Blocks complete in order, so a put follows the last one; one that starts
        earlier (the request is computed again after preemption) overwrites and
        forgets every block after it."""
        n, D = keys.shape[0], lo.shape[-1]
        entry = self._entries.get((request, layer))
        if entry is None or entry.keys.shape[0] < first_block + n:
            old, entry = entry, self._grow(entry, first_block + n, keys, values)
            self._nbytes += _size(entry) - (0 if old is None else _size(old))
            self._entries[(request, layer)] = entry
        if entry.blocks and first_block > entry.blocks:  # (a request's first put may start past block 0)
            raise RuntimeError(f"top-k host store: block {first_block} of {request} follows block {entry.blocks - 1}")
        stop = first_block + n
        entry.keys[first_block:stop] = keys.transpose(1, 2).to(self.device)
        entry.values[first_block:stop] = values.transpose(1, 2).to(self.device)
        entry.bounds[:, :D, first_block:stop] = hi.permute(1, 2, 0).to(self.device)
        entry.bounds[:, D:, first_block:stop] = lo.permute(1, 2, 0).to(self.device)
        if keys_at_zero is not None:
            entry.at_zero[first_block:stop] = keys_at_zero.transpose(1, 2).to(self.device, entry.at_zero.dtype)
        entry.blocks = stop

    def _grow(self, entry: _Entry | None, need: int, keys, values) -> _Entry:
        cap = max(need, 2 * (0 if entry is None else entry.keys.shape[0]), 16)  # amortised doubling
        _, B, Hkv, D = keys.shape
        new = _Entry(
            keys=torch.zeros(cap, Hkv, B, D, dtype=keys.dtype, device=self.device),
            pairs=torch.zeros(cap, Hkv, B, D + values.shape[-1], dtype=keys.dtype, device=self.device),
            bounds=torch.zeros(Hkv, 2 * D, cap, dtype=torch.float32, device=self.device),
        )
        if entry is not None:
            n = entry.blocks
            for name in ("keys", "pairs"):
                getattr(new, name)[:n] = getattr(entry, name)[:n]
            new.bounds[..., :n] = entry.bounds[..., :n]
            new.blocks = n
        return new

    def bounds(self, request: str, layer: int, start: int, stop: int) -> torch.Tensor:
        """The summaries of blocks [start, stop) (all stored) as one matrix per KV head,
        [Hkv, 2 D, stop - start]: hi's channels, then lo's (topk_attention.select_from_bounds)."""
        entry = self._entries[(request, layer)]
        if stop > entry.blocks:
            raise RuntimeError(f"top-k host store: block {stop - 1} of {request} was never stored")
        return entry.bounds[..., start:stop]

    def keys_at_zero(self, request: str, layer: int, start: int, stop: int) -> torch.Tensor:
        """The keys rotated back to position 0 of blocks [start, stop) (all stored), in place (a view,
        no copy): [stop - start, Hkv, B, D] in the cache dtype (topk_attention.select_from_mass)."""
        entry = self._entries[(request, layer)]
        if stop > entry.blocks:
            raise RuntimeError(f"top-k host store: block {stop - 1} of {request} was never stored")
        return entry.at_zero[start:stop]

    def gather_far(self, request: str, layer: int, blocks: torch.Tensor, with_keys: bool):
        """Keys at position 0, values and (with_keys) keys as stored of blocks [Hkv, n], one list
        per KV head, each [Hkv, n * B, D] in the cache dtype (keys: None without with_keys).
        Head h reads only its own slice of each of its blocks."""
        entry = self._entries[(request, layer)]
        Hkv, n = blocks.shape
        rows = block_head_numbers(blocks.to(self.device), Hkv).flatten()

        def take(t: torch.Tensor) -> torch.Tensor:  # (block, head) rows: index_select, several times faster
            return t.view(-1, *t.shape[2:]).index_select(0, rows).view(Hkv, n * t.shape[2], t.shape[3])

        return take(entry.at_zero), take(entry.values), take(entry.keys) if with_keys else None

    def head_rows(self, request: str, layer: int, as_stored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys at position 0 (as_stored: rotated at their true positions) and the values, in
        place, as rows [N, 1, D] of one KV head each: row (block * Hkv + head) * B + slot (any
        head's list of rows in one table)."""
        entry = self._entries[(request, layer)]
        keys = entry.keys if as_stored else entry.at_zero
        return keys.view(-1, 1, keys.shape[-1]), entry.values.view(-1, 1, entry.values.shape[-1])

    def block_heads(self, request: str, layer: int) -> torch.Tensor:
        """The keys at position 0 and the values, in place, one (block, KV head) per row
        [capacity * Hkv, B, D + Dv]: row block * Hkv + head, as the pool's block-heads
        (topk_in_pool copies whole ones)."""
        pairs = self._entries[(request, layer)].pairs
        return pairs.view(-1, *pairs.shape[2:])

    def drop(self, requests) -> None:
        """Forget finished requests."""
        gone = set(requests)
        if gone:
            for key in [key for key in self._entries if key[0] in gone]:
                self._nbytes -= _size(self._entries.pop(key))

    def requests(self) -> set[str]:
        return {request for request, _ in self._entries}

    def nbytes(self) -> int:
        """Host memory held (capacity, not only the valid blocks)."""
        return self._nbytes


def _size(entry: _Entry) -> int:
    return sum(t.nbytes for t in (entry.keys, entry.pairs, entry.bounds))
