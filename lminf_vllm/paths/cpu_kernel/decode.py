"""Decode rows and plain rows through vLLM's CPU kernel, as virtual sequences.

Λ-attention is a sliding window plus G global keys seen at a capped distance,
so a decode query at position i can be handed to the kernel as a *virtual
sequence*:

    [its window blocks, from the one holding i - W + 1, up to row i] + [G globals]

where the G global keys are re-rotated copies (position i - min(i - j, C), so
that the kernel's dot product sees the capped distance). A window of W + G
keys masks exactly the rows of the first block that precede the window, and a
decode query of the kernel sees every key of its sequence, so the order of
the keys does not matter. Where the copies go (`placement`):

  * "after": into the request's own next G slots, i + 1 .. i + G, when these
    lie in its last block (allocated, and private: a block is shared through
    the prefix cache only once full). They hold no token yet, and each token
    that later lands there overwrites its copy before anything reads it.
  * "front" (the G steps in B when they would leave the block): into the end
    of vLLM's null block (block 0, never given to a request, never read),
    together with the row's window keys of its partly visible first block;
    the virtual sequence is then [null block] + [window from its next block].
    The null block holds one row's copies at a time: the first such row of a
    step joins the shared kernel call, each further one has its own. The
    copies of every front row of a step are gathered and rotated together,
    once per layer (one flat Copies, shift [1, N]); each front call then only writes its own
    slice into the null block and attends.
  * None: the copies fit neither way (rare: with W a multiple of B it needs
    G > B / 2); the row takes the PyTorch math.
No slot is reserved for this: the KV bound of SPEC.md is unchanged. Plain rows
(routing.Rows.ALL_KEYS, prefill chunks too) join the shared call as they are.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import NULL_BLOCK
from lminf_vllm.paths.cpu_kernel.ops import attend, kernel_cache_views, scheduler_metadata, write_kv_kernel
from lminf_vllm.rope import RotarySpec, cos_sin, rotate
from lminf_vllm.routing import plain_stop


def placement(i: int, cfg: LminfConfig, block_size: int) -> str | None:
    """Where the global copies of a decode row at i >= W + G - 1 go: "after", "front" or None."""
    G, W, B = cfg.global_tokens, cfg.local_tokens, block_size
    if i % B + G < B:
        return "after"
    return "front" if _front_rows(i, W, B) + G <= B else None


def _front_rows(i: int, W: int, B: int) -> int:
    """Window keys of a query at i in its first window block when that block is only partly visible."""
    start = (i - W + 1) % B
    return B - start if start else 0


@dataclass
class Copies:
    """Keys and values copied before a call, E per appending row: the G global
    keys re-rotated (and, for a "front" row, its window rows of a partly
    visible first block, shift 0)."""

    k_index: torch.Tensor  # [Ra * E, Hkv, D] long: offsets of the source key and value in the flat cache
    v_index: torch.Tensor
    slots: torch.Tensor  # [Ra * E] long: flat destination slots
    shift: torch.Tensor  # [Ra, E] long: rotate the key forward by d - min(d, C) positions
    # The rotations by `shift` as matrices, per rotary (layers may differ),
    # made by the first layer that needs them.
    _rotations: dict = field(default_factory=dict)

    def rotations(self, rotary: RotarySpec, head_size: int) -> torch.Tensor:
        """[Ra, E, D, D]: a key row k rotated by its copy's shift is k @ M. One small
        matmul per layer instead of the dozen elementwise ops of rope.rotate."""
        key = id(rotary.inv_freq)
        if key not in self._rotations:
            cos, sin = cos_sin(self.shift, rotary.inv_freq, torch.float32)
            Ra, E = self.shift.shape
            basis = torch.eye(head_size, device=cos.device).expand(Ra, E, head_size, head_size)
            # rope.rotate is linear: row d of M is the d-th unit vector rotated.
            self._rotations[key] = rotate(basis, cos[:, :, None], sin[:, :, None], rotary)
        return self._rotations[key]


@dataclass
class KernelCall:
    """One call of the kernel, shared by every layer (planned once per step by the metadata builder)."""

    tokens: torch.Tensor | None  # [Tk] long: the batch's query tokens it serves (None: the first Tk, in order)
    query_start_loc: torch.Tensor  # [Rk + 1] int32, into `tokens`
    seq_lens: torch.Tensor  # [Rk] int32: virtual sequence lengths
    block_table: torch.Tensor  # [Rk, nbv] int32: virtual block tables
    window: int  # the kernel's sliding window: W + G (-1: none, all rows plain)
    copies: list[Copies]  # written before the call (the "after" rows')
    scheduler_metadata: torch.Tensor | None = None  # made once the calls of a step are final
    # A "front" row's copies: (start, stop, null-block slots) of the step's front copies, written before the call.
    front: tuple[int, int, torch.Tensor] | None = None
    token_start: int | None = None  # tokens is the range token_start + [0, len): read and write in place


def plan_calls(
    shared: list[tuple[int, int, int, int]],  # plain and "after" rows: (request, first token, count, seq_len)
    fronts: list[tuple[int, int, int, int]],  # "front" rows
    block_table: torch.Tensor,  # [num_reqs, max_blocks]
    cfg: LminfConfig,
    block_size: int,
    isa: str,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
) -> tuple[list["KernelCall"], Copies | None]:
    """The kernel calls for these rows, and the front rows' copies. The plain and
    "after" rows share one call; "front" rows all use the null block, so each
    needs its own call, except that the first joins the shared one."""
    args = (block_table, cfg, block_size, num_kv_heads, head_size)
    calls = [_plan_call(shared, *args)] if shared else []
    front_copies = None
    if fronts:
        front_calls, front_copies = _plan_fronts(fronts, *args)
        calls += front_calls
    if shared and fronts:  # one call fewer per layer: its Python and its launch
        calls[:2] = [_merge(calls[0], calls[1], cfg)]
    for call in calls:
        call.scheduler_metadata = scheduler_metadata(
            call.query_start_loc, call.seq_lens, call.window, isa, num_heads, num_kv_heads, head_size, dtype
        )
    return calls, front_copies


def _merge(a: KernelCall, b: KernelCall, cfg: LminfConfig) -> KernelCall:
    """One call doing a's rows then b's (their copies never share a slot)."""
    n_a = int(a.query_start_loc[-1])
    listed = lambda c: torch.arange(int(c.query_start_loc[-1])) if c.tokens is None else c.tokens  # noqa: E731
    assert not (a.front and b.front), "one null block: one front row per call"
    tokens = torch.cat((listed(a), listed(b)))
    if torch.equal(tokens, torch.arange(len(tokens))):
        tokens = None  # the batch's first tokens, in order: read and write in place
    qsl = torch.cat((a.query_start_loc, b.query_start_loc[1:] + n_a))
    seq = torch.cat((a.seq_lens, b.seq_lens))
    width = max(a.block_table.shape[1], b.block_table.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731 (padding is never read)
    window = cfg.local_tokens + cfg.global_tokens  # plain rows of `a` see all their keys within it too
    table = torch.cat((pad(a.block_table), pad(b.block_table)))
    return KernelCall(
        tokens=tokens, query_start_loc=qsl, seq_lens=seq, block_table=table, window=window, copies=a.copies + b.copies,
        front=a.front or b.front,
    )


def plain_call(query_start_loc, seq_lens, block_table, isa, num_heads, num_kv_heads, head_size, dtype):
    """The call for a batch whose every request is a plain row: vLLM's own metadata as it is."""
    qsl, seq = query_start_loc.to(torch.int32), seq_lens.to(torch.int32)
    # Plain rows see all their keys: no window, the kernel's full-attention path as for stock.
    return KernelCall(
        tokens=None, query_start_loc=qsl, seq_lens=seq, block_table=block_table.to(torch.int32), window=-1,
        copies=[], scheduler_metadata=scheduler_metadata(qsl, seq, -1, isa, num_heads, num_kv_heads, head_size, dtype),
    )  # fmt: skip


def _table_reader(block_table: torch.Tensor):
    # Read only the columns a row needs: a table row is max_model_len / B wide (2^25 at 2^30 tokens).
    whole = block_table.cpu().numpy()  # a view, not a copy

    def ids(reqs, cols):  # block ids at [reqs[r], cols[r, c]]
        return whole[reqs[:, None], np.minimum(cols, whole.shape[1] - 1)]

    return ids


def _sources(ids, src_req, src_pos, B, Hkv, D):
    """Flat offsets of the keys and values at src_pos of the requests src_req, in the kernel's
    layout (per block and head: keys [D, B], then values [B, D]): [N, Hkv, D] each."""
    src_blk = ids(src_req, src_pos // B) if src_pos.size else src_pos
    base = (src_blk.reshape(-1, 1, 1) * Hkv + np.arange(Hkv)[:, None]) * (2 * B * D)  # [N, Hkv, 1]
    row = (src_pos % B).reshape(-1, 1, 1)
    return base + np.arange(D) * B + row, base + B * D + row * D + np.arange(D)


def _as_tensor(a, device, dtype=torch.long):
    return torch.from_numpy(np.array(a)).to(device, dtype)  # (a copy: writable)


def _plan_call(rows, block_table, cfg, B, num_kv_heads, head_size):
    """The shared call: plain and "after" rows."""
    # Index arithmetic on a handful of rows: numpy, not many tiny torch ops.
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    req, first_tok, counts, seq = (np.array(col, dtype=np.int64) for col in zip(*rows))
    i = seq - 1
    is_app = (seq > 1) & (seq > plain_stop(cfg))  # rows that get global copies after them (not is_plain)
    ids = _table_reader(block_table)
    j = np.arange(G)
    # window from its first block (block 0 for plain rows), row i, then the G globals
    first_blk = np.where(is_app, (i - W + 1) // B, 0)
    vlen = seq - first_blk * B + np.where(is_app, G, 0)
    nbv = int(((vlen + B - 1) // B).max())
    table = ids(req, first_blk[:, None] + np.arange(nbv))
    app = np.nonzero(is_app)[0]
    src_pos = np.broadcast_to(j, (len(app), G))
    p = i[app, None] + 1 + j  # the slots after the query
    src_req = req[app]
    dst_slot = ids(src_req, p // B) * B + p % B
    d = i[app, None] - j
    shift = d - np.minimum(d, C)
    k_index, v_index = _sources(ids, src_req, src_pos, B, num_kv_heads, head_size)
    qsl = np.zeros(len(rows) + 1, dtype=np.int64)
    qsl[1:] = np.cumsum(counts)
    tokens = np.repeat(first_tok - qsl[:-1], counts) + np.arange(qsl[-1])  # each row's tokens, in row order
    dev = block_table.device
    window = W + G if is_app.any() else -1  # (plain rows alone: no window, as above)
    in_order = np.array_equal(tokens, np.arange(len(tokens)))  # the batch's first tokens: read and write in place
    return KernelCall(
        tokens=None if in_order else _as_tensor(tokens, dev), query_start_loc=_as_tensor(qsl, dev, torch.int32),
        seq_lens=_as_tensor(vlen, dev, torch.int32), block_table=_as_tensor(table, dev, torch.int32), window=window,
        copies=[Copies(k_index=_as_tensor(k_index, dev), v_index=_as_tensor(v_index, dev),
                       slots=_as_tensor(dst_slot.reshape(-1), dev), shift=_as_tensor(shift, dev))],
    )  # fmt: skip


def _plan_fronts(rows, block_table, cfg, B, num_kv_heads, head_size):
    """One call per "front" row, over [null block: its copies at the end] + its window from
    the first whole block; their copies planned together, flat: one Copies of shift [1, N]."""
    G, W, C = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap
    req, first_tok, counts, seq = (np.array(col, dtype=np.int64) for col in zip(*rows))
    assert (counts == 1).all(), "front rows are decode rows"
    i = seq - 1
    start = (i - W + 1) % B
    m = np.where(start > 0, B - start, 0)  # window keys in a partly visible first block (_front_rows)
    first_blk = (i - W + 1) // B + (m > 0)
    vlen = B + seq - first_blk * B
    nbv = int((i // B - first_blk).max()) + 1  # window blocks after the null block
    ids = _table_reader(block_table)
    table = np.concatenate((np.full((len(rows), 1), NULL_BLOCK), ids(req, first_blk[:, None] + np.arange(nbv))), 1)
    # Copy e of row r: global e (e < G) or window row e - G of its first block; E_r = G + m_r of them.
    E = G + m
    e = np.arange(int(E.max()))
    valid = e[None] < E[:, None]  # [F, max E]
    src_pos = np.where(e[None] < G, e[None], i[:, None] - W + 1 + e[None] - G)
    dst_slot = B - E[:, None] + e[None]  # slots at the end of the null block
    d = i[:, None] - e[None]
    shift = np.where(e[None] < G, d - np.minimum(d, C), 0)
    src_req = np.broadcast_to(req[:, None], valid.shape)
    src_pos, dst_slot, shift, src_req = (a[valid] for a in (src_pos, dst_slot, shift, src_req))  # flat, row-major
    k_index, v_index = _sources(ids, src_req, src_pos[:, None], B, num_kv_heads, head_size)
    offsets = np.concatenate(([0], np.cumsum(E)))
    dev = block_table.device
    slots = _as_tensor(NULL_BLOCK * B + dst_slot, dev)
    tables, vlens = _as_tensor(table, dev, torch.int32), _as_tensor(vlen, dev, torch.int32)
    tokens, qsl = _as_tensor(first_tok, dev), torch.tensor([0, 1], dtype=torch.int32, device=dev)
    calls = [
        KernelCall(tokens=tokens[r : r + 1], query_start_loc=qsl, seq_lens=vlens[r : r + 1],
                   block_table=tables[r : r + 1], window=W + G, copies=[],
                   front=(int(offsets[r]), int(offsets[r + 1]), slots[offsets[r] : offsets[r + 1]]),
                   token_start=int(first_tok[r]))
        for r in range(len(rows))
    ]  # fmt: skip
    copies = Copies(k_index=_as_tensor(k_index, dev).view(-1, num_kv_heads, head_size),
                    v_index=_as_tensor(v_index, dev).view(-1, num_kv_heads, head_size),
                    slots=slots, shift=_as_tensor(shift, dev)[None])  # fmt: skip
    return calls, copies


def run_calls(
    calls: list["KernelCall"],
    query: torch.Tensor,  # [T, H, D] the whole batch
    kv_cache: torch.Tensor,
    scale: float,
    rotary: RotarySpec | None,
    isa: str,
    output: torch.Tensor,  # [T, H, D]: the planned rows are written
    front_copies: Copies | None = None,  # every front row's, gathered and rotated once here
) -> None:
    staged = _gather(front_copies, kv_cache, rotary) if front_copies is not None else None
    for call in calls:
        _run_call(query, kv_cache, call, scale, rotary, isa, output, staged)


def _gather(copies: Copies, kv_cache, rotary):
    """The copies' keys (re-rotated) and values, [N, Hkv, D] each."""
    Ra, E = copies.shift.shape
    flat = kv_cache.view(-1)
    k, v = flat.take(copies.k_index), flat.take(copies.v_index)  # [Ra * E, Hkv, D]
    if rotary is not None and Ra and E:
        m = copies.rotations(rotary, k.shape[-1])
        k = torch.matmul(k.view(Ra, E, *k.shape[1:]).float(), m).to(k.dtype).view(k.shape)
    return k, v


def _run_call(query, kv_cache, call: KernelCall, scale, rotary, isa, output, staged=None) -> None:
    for copies in call.copies:
        Ra, E = copies.shift.shape
        if not (Ra and E):
            continue
        k, v = _gather(copies, kv_cache, rotary)
        write_kv_kernel(kv_cache, k, v, copies.slots, isa)
    if call.front is not None:
        a, b, slots = call.front
        write_kv_kernel(kv_cache, staged[0][a:b], staged[1][a:b], slots, isa)
    kc, vc = kernel_cache_views(kv_cache)
    if call.tokens is None:  # the batch's first n tokens, in order: read and write in place
        n = int(call.query_start_loc[-1])
        q, out = query[:n], output[:n]
    elif call.token_start is not None:  # a range of the batch's tokens: in place too
        s = call.token_start
        q, out = query[s : s + len(call.tokens)], output[s : s + len(call.tokens)]
    else:
        q = query[call.tokens].contiguous()
        out = torch.empty_like(q)
    attend(q, kc, vc, out, call.query_start_loc, call.seq_lens, call.block_table, call.window,
           call.scheduler_metadata, scale)  # fmt: skip
    if call.tokens is not None and call.token_start is None:
        output[call.tokens] = out.to(output.dtype)
