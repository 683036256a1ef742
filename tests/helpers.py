"""Helpers only tests call, kept out of lminf_vllm/ (whose runtime modules hold what the engine uses).

Each is written with the runtime's own parts, as it was in the module its section names."""

import contextlib
import logging

import torch

from lminf_vllm import versions
from lminf_vllm.paths.topk import store as topk_store
from lminf_vllm.block_policy import freeable_blocks
from lminf_vllm.kv_layout import token_views
from lminf_vllm.paths.topk.ops import ListedCall
from lminf_vllm.runtime_patches._util import _MARK, _lookup, _unwrap
from lminf_vllm.paths.topk.attention import select_from_bounds


# ---------------------------------------------------------------- block_policy


def kept_blocks(n: int, G: int, W: int, B: int, upto: int) -> list[int]:
    """Logical blocks kept among [0, upto) once n tokens are computed."""
    gone = freeable_blocks(n, G, W, B)
    return [b for b in range(upto) if b not in gone]


# ---------------------------------------------------------------- versions, runtime_patches


def check_vllm_version() -> str:
    """The installed vLLM's version, else UnsupportedVllmVersion with the message register() gives."""
    version = versions.installed_vllm_version()
    if not versions.is_supported(version):
        raise versions.UnsupportedVllmVersion(versions.unsupported_message(version))
    return version


def original_of(owner, name: str):
    """What a runtime patch replaced at owner.name (replace_attr keeps it on the new one)."""
    current = _lookup(owner, name)
    return getattr(_unwrap(current), _MARK, current)


# ---------------------------------------------------------------- top-k


class HostStore(topk_store.HostStore):
    """The engine's host store with the reads only tests make."""

    def blocks(self, request: str, layer: int) -> int:
        entry = self._entries.get((request, layer))
        return 0 if entry is None else entry.blocks

    def summaries(self, request: str, layer: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """lo, hi [stop - start, Hkv, D] of blocks [start, stop) (all stored; views of `bounds`)."""
        per_block = torch.cat(self.bounds(request, layer, start, stop), -1).permute(2, 0, 1)
        D = per_block.shape[-1] // 2
        return per_block[..., D:], per_block[..., :D]

    def gather(self, request: str, layer: int, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys at position 0 and values of the chosen blocks [Hkv, k] (one list per KV head): [Hkv, k * B, D] each."""
        return self.gather_far(request, layer, chosen)

    def chunks(self, request: str, layer: int) -> int:
        """Chunks held for (request, layer)."""
        entry = self._entries.get((request, layer))
        return 0 if entry is None else len(entry.keys)


def select_blocks(q_cap: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, first: int, k: int) -> torch.Tensor:
    """attention.select_from_bounds with the summaries apart: q_cap [H, D] float32, the last
    row's query rotated to position C; lo, hi [nc, Hkv, D] the summaries of the candidate blocks
    first .. first + nc - 1. -> [Hkv, min(k, nc)] block numbers, ascending per KV head."""
    return select_from_bounds(q_cap, torch.cat((hi, lo), dim=-1).permute(1, 2, 0), first, k)


def attend_listed(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tokens: torch.Tensor, scale: float,
                  splits: int = 0):  # fmt: skip
    """One paths/topk/ops.ListedCall: q [R, H, D] over the rows tokens [R, n] of keys and values
    [N, Hkv, D] -> outputs [R, H, Dv] float32 and log-sum-exps [R, H]."""
    call = ListedCall(*tokens.shape, q.shape[1], keys.shape[1], q.shape[2], q.dtype, splits)
    return call(q, keys, values, tokens.to(torch.int32).contiguous(), scale)


def window(q: torch.Tensor, kv_cache: torch.Tensor, tokens: torch.Tensor, scale: float, splits: int = 0):
    """Decode rows q [R, H, D] over their window slots tokens [R, W] (kv_layout.token_numbers) of
    an OWN_LAYOUT cache, read in place: attend_listed."""
    return attend_listed(q, *token_views(kv_cache), tokens, scale, splits)


@contextlib.contextmanager
def logged(name: str = "vllm.lminf"):
    """The messages a logger writes meanwhile, at INFO and up, whatever vLLM's logging config does
    with propagation (caplog sees only what reaches the root logger)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger(name)
    level = log.level
    log.addHandler(handler)
    log.setLevel(min(level or logging.INFO, logging.INFO))
    try:
        yield lines
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def resident_bytes(array, row: int, cols: int) -> int:
    """Bytes of array[row, :cols] in memory now: pages present per /proc/self/pagemap.
    (smaps cannot tell: the kernel merges neighbouring anonymous mappings.)"""
    import mmap

    import numpy as np

    start = array.ctypes.data + row * array.strides[0]
    first, last = start // mmap.PAGESIZE, (start + cols * array.itemsize - 1) // mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = np.frombuffer(pagemap.read((last - first + 1) * 8), dtype=np.uint64)
    return int((entries >> np.uint64(63)).sum()) * mmap.PAGESIZE


def unbuildable_pass_warns(module, monkeypatch, caplog, says: str) -> None:
    """A C++ pass module of paths/topk (mass_kernel, far_kernel) whose source cannot be built:
    kernel_ok warns (`says` in the log) and usable says no, instead of failing the engine's step.
    Its cached build and check are cleared before and after."""
    monkeypatch.setattr(module, "_SOURCE", "this is not C++")
    module._kernel.cache_clear(), module.kernel_ok.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="vllm.lminf"):
            assert not module.usable(torch.float16)
        assert says in caplog.text
    finally:
        module._kernel.cache_clear(), module.kernel_ok.cache_clear()
