"""Per-request buffers sized by what a request holds, not by max_model_len; a streaming re-add writes only its new tokens.

Target: vllm.v1.worker.gpu_input_batch.InputBatch.__init__, .remove_request and .condense
Why: the input batch keeps a row of token ids (int32) and a row of "is a token"
    flags (bool) per request slot, each max_model_len wide (vLLM's own TODO
    says so), and the block table a row of block ids per slot,
    max_model_len / B wide. lminf makes max_model_len free of KV cost, so a
    user may set 2^30: with vLLM's default 256 slots the token rows alone are
    1.25 TiB, and the engine cannot start (at 16M it started in 70 s with
    4 GiB more memory).
How: in engines that select lminf, build the batch as vLLM does but with
    those buffers reserved as address space (lazy_zeros.LazyZeros): a page
    becomes memory when a request writes into it, so a row costs its
    request's tokens (5 bytes a token) and blocks (4 bytes a block). At the end
    of each step's removals and adds (condense), a row left empty hands its
    pages back, and a row another request took keeps only the pages that
    request wrote; a streaming session's next chunk removes and re-adds its
    own request in one step and keeps its row (releasing it would only fault
    it all back in). A finished million-token session leaves nothing behind.
    The block table is reserved that way only where the worker's "device"
    table is the host one (the CPU worker); on CUDA it stays vLLM's (a device
    row per slot, max_model_len / B wide: a ring of KV-bound width is the
    upstream change below). Engines without lminf are untouched.
Upstream: reserve the token rows lazily as here (the diff); under a
    sliding-window-like KV manager, keep block tables as rings of the KV
    bound's width, read modulo by the attention and the slot mapping (not
    written yet: every lminf kernel path indexes rows by logical block).
Remove when: vLLM does so.

Target 2: InputBatch.add_request
Why: a streaming session's next chunk removes its request and adds it back,
    and the add writes the session's whole prompt into the token row (about
    20 ns a token each chunk: 0.2 s at 10M tokens), though the row already
    holds all of it but the new chunk.
How: when the runner patch rebuilt the prompt from its new tokens
    (lminf_vllm.streaming_tail), it says how many the row holds (keep_row_prefix);
    if the add lands in the row the request left this step, the row's write and
    its flags' skip those columns (a stand-in for the two buffers during that
    add, RowWriteFrom). Elsewhere the write is vLLM's.
Upstream: CachedRequestState.row_holds, read by add_request (the diff).
Remove when: vLLM does so.
"""

from lminf_vllm.runtime_patches._util import is_patched, replace_attr
from lminf_vllm.versions import SUPPORTED_VLLM_SERIES

TARGET = "vllm.v1.worker.gpu_input_batch.InputBatch.__init__"
VLLM_VERSIONS = SUPPORTED_VLLM_SERIES
_LAZY = "_lminf_lazy_rows"  # (LazyZeros, columns in use of a row) of a batch built here (absent: vLLM's buffers)
_REMOVED = "_lminf_removed_this_step"  # row -> the request removed from it, until condense
_PREFIX = "_lminf_row_prefix"  # request -> (row it left, tokens there that its next prompt starts with)


def lminf_engine_is_building() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    from lminf_vllm.vllm_config import is_lminf_selected

    config = get_current_vllm_config_or_none()
    return config is not None and is_lminf_selected(config)


def lazy_block_table(table, max_num_reqs: int, width: int):
    """Give a worker BlockTable a host table [max_num_reqs, width] reserved lazily."""
    from lminf_vllm.lazy_zeros import LazyZeros

    rows = LazyZeros(max_num_reqs, width, table.block_table.cpu.dtype)
    buffer = table.block_table
    buffer.cpu = buffer.gpu = rows.tensor
    buffer.np = rows.array
    table.max_num_blocks_per_req = width
    return rows


def reserve_lazily(batch, max_model_len: int, block_widths: list[int] | None) -> None:
    import torch

    from lminf_vllm.lazy_zeros import LazyZeros

    tokens = LazyZeros(batch.max_num_reqs, max_model_len, torch.int32)
    flags = LazyZeros(batch.max_num_reqs, max_model_len, torch.bool)
    batch.token_ids_cpu_tensor, batch.token_ids_cpu = tokens.tensor, tokens.array
    batch.is_token_ids_tensor, batch.is_token_ids = flags.tensor, flags.array
    batch.max_model_len = max_model_len

    def tokens_in(row):  # the columns vLLM copies when it moves a row
        return int(batch.num_tokens_no_spec[row]) + len(batch.spec_token_ids[row])

    def blocks_in(table):
        return lambda row: int(table.num_blocks_per_row[row])

    lazy = [(tokens, tokens_in), (flags, tokens_in)]
    for table, width in zip(batch.block_table.block_tables, block_widths or []):
        lazy.append((lazy_block_table(table, batch.max_num_reqs, width), blocks_in(table)))
    setattr(batch, _LAZY, lazy)


def keep_row_prefix(batch, req_id: str, row: int, tokens: int) -> None:
    """The request just left `row`, whose first `tokens` columns its next prompt starts with."""
    if hasattr(batch, _LAZY):
        batch.__dict__.setdefault(_PREFIX, {})[req_id] = (row, tokens)


class RowWriteFrom:
    """Stands in for a [rows, columns] buffer during one add_request: the write of `row`'s
    first columns starts at column `start` (those before it are there already)."""

    def __init__(self, array, row: int, start: int):
        self.array, self.row, self.start = array, row, start

    def __setitem__(self, key, value):
        row, cols = key if isinstance(key, tuple) and len(key) == 2 else (None, None)
        if row == self.row and isinstance(cols, slice) and not cols.start and cols.step is None and (cols.stop or 0) >= self.start:
            key = (row, slice(self.start, cols.stop))
            value = value[self.start : cols.stop] if isinstance(value, list) else value
        self.array[key] = value

    def __getitem__(self, key):
        return self.array[key]


def apply() -> bool:
    import inspect

    from vllm.v1.worker.gpu_input_batch import InputBatch

    def make_init(original):
        signature = inspect.signature(original)

        def __init__(self, *args, **kwargs):
            if not lminf_engine_is_building():
                return original(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            full_len, on_host = a["max_model_len"], a["device"].type == "cpu"
            # vLLM pads the width for its GPU slot-mapping kernel; on the host a row needs only these
            widths = list(a["max_num_blocks_per_req"]) if on_host else None
            a["max_model_len"] = 1  # vLLM's own buffers at one column; the full ones are reserved below
            if on_host:
                a["max_num_blocks_per_req"] = [1] * len(a["block_sizes"])
            original(*bound.args, **bound.kwargs)
            reserve_lazily(self, full_len, widths)

        return __init__

    def make_remove(original):
        def remove_request(self, req_id):
            index = original(self, req_id)
            if index is not None and hasattr(self, _LAZY):
                self.__dict__.setdefault(_REMOVED, {})[index] = req_id
            return index

        return remove_request

    def make_condense(original):
        def condense(self):
            lazy = getattr(self, _LAZY, None)
            if not lazy:
                return original(self)
            before = {i for i, r in enumerate(self._req_ids) if r is not None}
            original(self)
            held = {i: r for i, r in enumerate(self._req_ids) if r is not None}
            removed = self.__dict__.pop(_REMOVED, {})
            for rows, in_use in lazy:
                # rows a removal or a move left empty: all their pages
                rows.release_rows(sorted((before | set(removed)) - set(held)))
                # a slot another request took this step: the pages past what it wrote (a
                # streaming session's next chunk re-adds its own request there: kept)
                for index, old in removed.items():
                    if index in held and held[index] != old:
                        rows.release_rows([index], from_col=in_use(index))

        return condense

    def make_add(original):
        def add_request(self, request):
            row, start = self.__dict__.get(_PREFIX, {}).pop(request.req_id, (None, 0))
            if not start or self.__dict__.get(_REMOVED, {}).get(row) != request.req_id:
                return original(self, request)
            tokens, flags = self.token_ids_cpu, self.is_token_ids
            self.token_ids_cpu, self.is_token_ids = RowWriteFrom(tokens, row, start), RowWriteFrom(flags, row, start)
            try:
                return original(self, request)
            finally:
                self.token_ids_cpu, self.is_token_ids = tokens, flags

        return add_request

    changed = replace_attr(InputBatch, "__init__", make_init)
    changed |= replace_attr(InputBatch, "add_request", make_add)
    changed |= replace_attr(InputBatch, "remove_request", make_remove)
    changed |= replace_attr(InputBatch, "condense", make_condense)
    return changed


def is_applied() -> bool:
    from vllm.v1.worker.gpu_input_batch import InputBatch

    return is_patched(InputBatch, "__init__")
