"""The host store of top-k attention: every middle block's keys, values and summary, one copy.

docs/topk-contract.md, "What the device pool and the host store hold". A block
leaves the KV pool the moment it falls out of the window (kv_cache.py); with
topk_blocks > 0 its keys and values are copied here first: in fact as soon as
the block is complete, since that is the last moment the worker certainly
still owns it (a freed block may be written by another sequence in the very
step that frees it). Kept per (request, layer), indexed by block number.

One copy of each key: rotated back to position 0, beside its value, a block and
KV head laid out as the pool lays them out (`block_heads`). Decode scores every
key past its window at distance C from there (one rotation of the query); a
reader that wants a key as stored (rotated at its true position: a prefill
chunk within C of it) rotates it forward, attention.rotated_to.
The summary of a block is Quest's: per KV head and channel, the minimum and
maximum of its keys at position 0 (float32), kept as one matrix per KV head
(`bounds`) so that scoring every block is one matmul.

A (request, layer) grows in chunks of `chunk_blocks` blocks (about CHUNK_TOKENS
tokens): a new chunk is allocated when the last one is full, and nothing held is
copied. What it holds is a pure function of the request's length
(`request_bytes`), which the scheduler's admission reads (runtime_patches/
patch_core_sched_scheduler.py). The interface (put, bounds, keys_at_zero,
sketch_at_zero, gather_far, block_heads, chunk_addresses, drop; memo keeps the C++ passes' address
tables) is what a disk or LMCache tier would implement. No vLLM import.
"""

import itertools
from dataclasses import dataclass, field

import torch

from lminf_vllm.kv_layout import block_head_numbers
from lminf_vllm.paths.topk import sketch

CHUNK_TOKENS = 2048  # a chunk holds the blocks of about this many tokens


def chunk_blocks(block_size: int) -> int:
    """Blocks per chunk of the store, for blocks of block_size tokens."""
    return max(1, -(-CHUNK_TOKENS // block_size))


def request_bytes(tokens: int, num_layers: int, block_size: int, num_kv_heads: int, head_size: int,
                  itemsize: int, value_size: int | None = None, int8: bool = False) -> int:  # fmt: skip
    """Host bytes the store holds for a request whose first `tokens` tokens are computed, on one
    rank: each complete block (tokens // B of them), in whole chunks, per layer, its keys at
    position 0 and values in the cache dtype (B x Hkv x (D + Dv) x itemsize) and its summary
    (Hkv x 2 D float32); with int8 (topk_score "mass_int8"), also the keys' 8-bit copy
    (B x Hkv x (D + 4): a byte a channel and a float32 scale a key)."""
    Dv = head_size if value_size is None else value_size
    n = chunk_blocks(block_size)
    chunks = -(-(tokens // block_size) // n)
    return num_layers * chunks * n * _block_bytes(block_size, num_kv_heads, head_size, Dv, itemsize, int8)


def _block_bytes(B: int, Hkv: int, D: int, Dv: int, itemsize: int, int8: bool) -> int:
    return B * Hkv * (D + Dv) * itemsize + Hkv * 2 * D * 4 + (B * Hkv * (D + 4) if int8 else 0)


@dataclass
class _Entry:
    # chunks [N, Hkv, B, D] in the cache dtype: the keys rotated back to position 0, apart from the
    # values (chunks [N, Hkv, B, Dv]): the mass score reads every key and no value, and reads a
    # block's keys as one contiguous piece several times faster than as the halves of key-value rows
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    bounds: list[torch.Tensor]  # chunks [Hkv, 2 D, N] float32: hi then lo, a column per block
    blocks: int = 0  # blocks [first put, blocks) are valid (zeros before the first put)
    nbytes: int = 0
    flat_keys: list = field(default_factory=list)  # keys' chunks viewed [N * Hkv, B, D] (block-heads)
    flat_values: list = field(default_factory=list)  # values' likewise, [N * Hkv, B, Dv]
    kept: tuple[int, torch.Tensor] | None = None  # (the row that scored it, [Hkv, k']): the last selection
    # with int8 (topk_score "mass_int8", sketch.py): chunks [N, Hkv, B, D] uint8 and [N, Hkv, B] float32
    keys8: list = field(default_factory=list)
    scales8: list = field(default_factory=list)
    version: int = 0  # new (store-wide) whenever the entry or its list of chunks changes: see memo

    @property
    def per_chunk(self) -> int:
        return self.keys[0].shape[0]


class HostStore:
    """Middle blocks off the KV pool, per (request, layer); a layer is any hashable key (its name)."""

    def __init__(self, device: torch.device | str = "cpu", int8: bool = False) -> None:
        self.device = torch.device(device)
        self.int8 = int8  # keep the keys' 8-bit copy too (sketch_at_zero)
        self._entries: dict[tuple, _Entry] = {}
        self._nbytes = 0  # held, kept as entries grow and go (read every step for /metrics)
        self.limit: int | None = None  # bytes: a put past it raises (the scheduler's admission keeps within it)
        self._versions = itertools.count(1)
        self._memo: dict = {}  # (what, layer) -> (rows' signature, value): see memo

    def put(self, request: str, layer, first_block: int, at_zero, values, lo, hi) -> None:
        """Blocks [first_block, first_block + n): at_zero (the keys rotated back to position 0, any
        float dtype) and values [n, B, Hkv, D], lo/hi [n, Hkv, D].

        Blocks complete in order, so a put follows the last one; one that starts
        earlier (a request computed again) overwrites and forgets every block after it."""
        n, B, Hkv, D = at_zero.shape
        entry = self._entries.get((request, layer))
        if entry is None:
            entry = self._entries[(request, layer)] = _Entry([], [], [], version=next(self._versions))
        if entry.blocks and first_block > entry.blocks:  # (a request's first put may start past block 0)
            raise RuntimeError(f"top-k host store: block {first_block} of {request} follows block {entry.blocks - 1}")
        stop = first_block + n
        if first_block < entry.blocks:  # computed again: a selection among the old blocks is stale
            entry.kept = None
        self._resize(entry, stop, B, Hkv, D, values.shape[-1], values.dtype, request)
        N = entry.per_chunk
        for c, i, j in _runs(first_block, stop, N):  # per chunk touched: a run of blocks
            rows = slice(c * N + i - first_block, c * N + j - first_block)
            entry.keys[c][i:j] = at_zero[rows].transpose(1, 2).to(self.device, values.dtype)
            entry.values[c][i:j] = values[rows].transpose(1, 2).to(self.device)
            entry.bounds[c][:, :D, i:j] = hi[rows].permute(1, 2, 0).to(self.device)
            entry.bounds[c][:, D:, i:j] = lo[rows].permute(1, 2, 0).to(self.device)
            if self.int8:  # (from the stored keys, in the cache dtype: what the eager way would read)
                entry.keys8[c][i:j], entry.scales8[c][i:j] = sketch.sketch_keys(entry.keys[c][i:j])
        entry.blocks = stop

    def _resize(self, entry: _Entry, blocks: int, B: int, Hkv: int, D: int, Dv: int, dtype, request: str) -> None:
        """Chunks for exactly `blocks` blocks: new ones zeroed, none copied; those past it dropped."""
        N = chunk_blocks(B)
        need = -(-blocks // N)
        per_chunk = N * _block_bytes(B, Hkv, D, Dv, dtype.itemsize, self.int8)
        grow = (need - len(entry.keys)) * per_chunk
        if grow > 0 and self.limit is not None and self._nbytes + grow > self.limit:
            raise RuntimeError(
                f"lminf top-k host store: {request} needs {self._nbytes + grow} bytes, more than "
                f"additional_config.lminf.topk_store_max_bytes = {self.limit}; the scheduler admits requests "
                "by this cap, so this is a bug or a request longer than it announced"
            )
        while len(entry.keys) < need:
            keys = torch.zeros(N, Hkv, B, D, dtype=dtype, device=self.device)
            values = torch.zeros(N, Hkv, B, Dv, dtype=dtype, device=self.device)
            entry.keys.append(keys), entry.values.append(values)
            entry.flat_keys.append(keys.view(N * Hkv, B, D)), entry.flat_values.append(values.view(N * Hkv, B, Dv))
            entry.bounds.append(torch.zeros(Hkv, 2 * D, N, dtype=torch.float32, device=self.device))
            if self.int8:
                entry.keys8.append(torch.full((N, Hkv, B, D), sketch.OFFSET, dtype=torch.uint8, device=self.device))
                entry.scales8.append(torch.zeros(N, Hkv, B, dtype=torch.float32, device=self.device))
        del entry.keys[need:], entry.values[need:], entry.flat_keys[need:], entry.flat_values[need:]
        del entry.bounds[need:], entry.keys8[need:], entry.scales8[need:]
        if per_chunk * len(entry.keys) != entry.nbytes:  # chunks came or went: addresses memo'd are stale
            entry.version = next(self._versions)
        self._nbytes += len(entry.keys) * per_chunk - entry.nbytes
        entry.nbytes = len(entry.keys) * per_chunk

    def _stored(self, request: str, layer, stop: int) -> _Entry:
        entry = self._entries[(request, layer)]
        if stop > entry.blocks:
            raise RuntimeError(f"top-k host store: block {stop - 1} of {request} was never stored")
        return entry

    def bounds(self, request: str, layer, start: int, stop: int) -> list[torch.Tensor]:
        """The summaries of blocks [start, stop) (all stored) as one matrix per KV head, in place
        (views), one per chunk in order: [Hkv, 2 D, n_c], hi's channels then lo's, sum n_c =
        stop - start (attention.select_from_bounds)."""
        entry = self._stored(request, layer, stop)
        return [entry.bounds[c][..., i:j] for c, i, j in _runs(start, stop, entry.per_chunk)]

    def block_shape(self, request: str, layer) -> tuple[int, int, torch.dtype]:
        """(KV heads, block size, the keys' dtype) of a (request, layer) that holds a chunk."""
        keys = self._entries[(request, layer)].keys[0]
        return keys.shape[1], keys.shape[2], keys.dtype

    def keys_at_zero(self, request: str, layer, start: int, stop: int) -> list[torch.Tensor]:
        """The keys rotated back to position 0 of blocks [start, stop) (all stored), in place (views,
        no copy), one per chunk in order: [n_c, Hkv, B, D] in the cache dtype, sum n_c = stop - start
        (attention.select_from_mass)."""
        entry = self._stored(request, layer, stop)
        return [entry.keys[c][i:j] for c, i, j in _runs(start, stop, entry.per_chunk)]

    def sketch_at_zero(self, request: str, layer, start: int, stop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """keys_at_zero's 8-bit copy (a store made with int8): per chunk in order, (uint8 keys
        [n_c, Hkv, B, D], float32 scales [n_c, Hkv, B]), views (sketch.sketch_keys of the stored keys)."""
        entry = self._stored(request, layer, stop)
        return [(entry.keys8[c][i:j], entry.scales8[c][i:j]) for c, i, j in _runs(start, stop, entry.per_chunk)]

    def gather_far(self, request: str, layer, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys at position 0 and values of blocks [Hkv, n], one list per KV head, each
        [Hkv, n * B, D] in the cache dtype (views of one gathered copy). Head h reads only its
        own slice of each of its blocks."""
        Hkv, n = blocks.shape
        keys, values = self.block_heads(request, layer, block_head_numbers(blocks.to(self.device), Hkv).flatten())
        return keys.view(Hkv, n * keys.shape[1], keys.shape[2]), values.view(Hkv, n * values.shape[1], values.shape[2])

    def block_heads(self, request: str, layer, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows block * Hkv + head of the (block, KV head) pieces: their keys at position 0
        [len(rows), B, D] and values [len(rows), B, Dv], as the pool's block-heads hold them.
        Copies."""
        entry = self._entries[(request, layer)]
        per = entry.flat_keys[0].shape[0]
        return _take(entry.flat_keys, rows, per), _take(entry.flat_values, rows, per)

    def chunk_addresses(self, request: str, layer) -> tuple[list[int], list[int]]:
        """The addresses of the (request, layer)'s chunks, keys' then values', in order: a C++ pass
        reads blocks in place through them (far_kernel.py; chunk_blocks(B) blocks a chunk)."""
        entry = self._entries[(request, layer)]
        return [t.data_ptr() for t in entry.keys], [t.data_ptr() for t in entry.values]

    def memo(self, what, layer, rows: list[tuple[str, int]], make):
        """make(), kept for the next call with the same `what`, layer and rows [(request, stop)] while
        each request's chunks stay the same: the address tables of the C++ passes (mass_kernel.Table,
        far_kernel.base_table), which change only when a row gains a block or a chunk comes or goes,
        so a decode step's layers do not rebuild them."""
        signature = tuple((self._stored(request, layer, stop).version, stop) for request, stop in rows)
        hit = self._memo.get((what, layer))
        if hit is not None and hit[0] == signature:
            return hit[1]
        value = make()
        self._memo[(what, layer)] = (signature, value)
        return value

    def keep(self, request: str, layer, row: int, chosen: torch.Tensor) -> None:
        """The selection [Hkv, k'] the query of position `row` scored, for decode rows after it."""
        self._entries[(request, layer)].kept = (row, chosen)

    def kept(self, request: str, layer) -> tuple[int, torch.Tensor] | None:
        """(row, selection) of the last keep, None before one (or after the request was computed again)."""
        entry = self._entries.get((request, layer))
        return None if entry is None else entry.kept

    def drop(self, requests) -> None:
        """Forget requests that ended or were preempted."""
        gone = set(requests)
        if gone:
            for key in [key for key in self._entries if key[0] in gone]:
                self._nbytes -= self._entries.pop(key).nbytes
            self._memo.clear()

    def requests(self) -> set[str]:
        return {request for request, _ in self._entries}

    def nbytes(self) -> int:
        """Host memory held: whole chunks, request_bytes per request."""
        return self._nbytes


def _runs(start: int, stop: int, per: int):
    """(chunk, first, stop) within each chunk of blocks [start, stop), in order."""
    a = start
    while a < stop:
        c = a // per
        b = min(stop, (c + 1) * per)
        yield c, a - c * per, b - c * per
        a = b


def _take(chunks: list[torch.Tensor], rows: torch.Tensor, per: int) -> torch.Tensor:
    """Rows of the chunks' concatenation (each chunk `per` rows), in order: one index_select where
    they lie in one chunk; else one stack of the rows (a decode step's picks: tens of rows, where an
    index_select and an indexed write per chunk touched cost several times more)."""
    if len(chunks) == 1:
        return chunks[0].index_select(0, rows)
    r = rows.tolist()
    first = r[0] // per
    if all(x // per == first for x in r):
        return chunks[first].index_select(0, rows - first * per)
    return torch.stack([chunks[x // per][x % per] for x in r])
