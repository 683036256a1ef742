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
    of a *scratch block*, together with the row's window keys of its partly
    visible first block; the virtual sequence is then [scratch block] +
    [window from its next block], and the kernel's window masks the rest of
    the scratch block. Scratch blocks are vLLM's null block (block 0, never
    given to a request, never read) and the last blocks of the step's other
    decode rows, past their query and their own copies: slots that hold no
    token yet and are private, as for "after". The copies must end the block,
    so each scratch block serves one front row; a front row left without one
    takes a call of its own on the null block, after the shared call.
  * None: the copies fit neither way (rare: with W a multiple of B it needs
    G > B / 2); the row takes the PyTorch math.
No slot is reserved for this: the KV bound of SPEC.md is unchanged. Plain rows
(routing.Rows.ALL_KEYS, prefill chunks too) join the shared call as they are.
A step's copies are planned together (`Copies`): per layer one gather, one
rotation and one write for the shared call, then one write per call of its own.
"""

from dataclasses import dataclass, field

import numpy as np
import torch

from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import NULL_BLOCK
from lminf_vllm.cpu_attention_kernel import attend, kernel_cache_views, scheduler_metadata, write_kv_kernel
from lminf_vllm.rope import RotarySpec, cos_sin, rotate
from lminf_vllm.routing import plain_stop

PLAIN, AFTER, FRONT = 0, 1, 2  # how a row of a call gets its keys


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
    """The keys and values a step copies into the cache before each layer's kernel
    calls, E per row: an "after" row's G global keys re-rotated, a "front" row's
    too plus its window rows of a partly visible first block (shift 0). Flat, in
    the order of the calls that read them."""

    key_heads: torch.Tensor  # [N * Hkv] long: source (block * Hkv + head) of each copy's head
    key_rows: torch.Tensor  # [N * Hkv] long: its row in the block
    value_rows: torch.Tensor  # [N * Hkv] long: the value's row of D in the cache seen as [-1, D]
    slots: torch.Tensor  # [N] long: flat destination slots
    shift: torch.Tensor  # [N] long: rotate the key forward by d - min(d, C) positions
    # cos and sin of the shifts per rotary (layers may differ), made by the first layer that needs them.
    _angles: dict = field(default_factory=dict)

    def rotated(self, k: torch.Tensor, rotary: RotarySpec) -> torch.Tensor:
        """k [N, Hkv, D] (float32), each copy rotated by its shift: three elementwise ops where
        rope.rotate takes eight (a D x D matrix per copy costs more to build than it saves), bit
        for bit rope.rotate's result (x1 * cos + x2 * -sin is x1 * cos - x2 * sin)."""
        key = id(rotary.inv_freq)
        if key not in self._angles:
            cos, sin = cos_sin(self.shift, rotary.inv_freq, torch.float32)
            cos, sin = cos[:, None], sin[:, None]  # the same for every KV head
            if rotary.is_neox_style:  # halves: (x1, x2) -> (x2, x1) is a roll by D / 2
                full = torch.cat((cos, cos), -1), torch.cat((-sin, sin), -1)
            else:  # interleaved pairs: swapped by a flip of each pair
                full = cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)
            self._angles[key] = (cos, sin, *full)
        cos, sin, cos2, sin2 = self._angles[key]
        if rotary.rotary_dim != k.shape[-1]:  # partial rotary: the general form
            return rotate(k, cos, sin, rotary)
        if rotary.is_neox_style:
            swapped = k.roll(k.shape[-1] // 2, -1)
        else:
            swapped = k.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return k * cos2 + swapped * sin2


@dataclass
class KernelCall:
    """One call of the kernel, shared by every layer (planned once per step by the metadata builder)."""

    tokens: torch.Tensor | None  # [Tk] long: the batch's query tokens it serves (None: the first Tk, in order)
    query_start_loc: torch.Tensor  # [Rk + 1] int32, into `tokens`
    seq_lens: torch.Tensor  # [Rk] int32: virtual sequence lengths
    block_table: torch.Tensor  # [Rk, nbv] int32: virtual block tables
    window: int  # the kernel's sliding window: W + G (-1: none, all rows plain)
    copies: tuple[int, int] = (0, 0)  # the step's Copies [a, b) written just before the call
    scheduler_metadata: torch.Tensor | None = None  # made once the calls of a step are final
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
) -> tuple[list[KernelCall], Copies | None]:
    """The kernel calls for these rows, and the copies they read. Plain, "after" and
    the front rows that find a scratch block share one call, in batch order; each
    other front row has its own, after it."""
    # Index arithmetic on a few dozen rows: numpy, not many tiny torch ops.
    G, W, C, B = cfg.global_tokens, cfg.local_tokens, cfg.distance_cap, block_size
    if not (shared or fronts):
        return [], None
    ids = _table_reader(block_table)
    req, first_tok, counts, seq = (np.array(col, dtype=np.int64) for col in zip(*(shared + fronts)))
    i = seq - 1
    kind = np.full(len(req), FRONT)
    kind[: len(shared)] = np.where((seq[: len(shared)] > 1) & (seq[: len(shared)] > plain_stop(cfg)), AFTER, PLAIN)
    start = (i - W + 1) % B
    m = np.where((kind == FRONT) & (start > 0), B - start, 0)  # window keys in a partly visible first block
    E = np.where(kind == PLAIN, 0, G + m)  # copies per row
    scratch, alone = _scratch_blocks(ids, req, counts, i, kind, E, G, B)
    order = np.lexsort((first_tok, alone))  # the shared call in batch order, then the rows alone
    req, first_tok, counts, seq, i, kind, m, E, scratch = (
        a[order] for a in (req, first_tok, counts, seq, i, kind, m, E, scratch)
    )
    n_shared = int((~alone).sum())

    # Virtual sequences: [scratch block (front rows)] + window blocks (from block 0 for plain rows) [+ G copies]
    lead = (kind == FRONT).astype(np.int64)
    first_blk = np.where(kind == PLAIN, 0, (i - W + 1) // B + (m > 0))
    vlen = lead * B + seq - first_blk * B + np.where(kind == AFTER, G, 0)
    nbv = int(((vlen + B - 1) // B).max())
    col = np.arange(nbv)
    cols = first_blk[:, None] + col - lead[:, None]
    table = np.where(col < lead[:, None], scratch[:, None], ids(req, np.maximum(cols, 0)))

    # Copies: copy e of a row is global e (e < G) or window row e - G of its first block.
    e = np.arange(int(E.max()))
    valid = e < E[:, None]
    src_pos = np.where(e < G, e, i[:, None] - W + 1 + e - G)
    d = i[:, None] - e
    shift = np.where(e < G, d - np.minimum(d, C), 0)
    after = i[:, None] + 1 + e  # "after": the slots following the query
    end = scratch[:, None] * B + B - E[:, None] + e  # "front": the last E slots of the scratch block
    dst = np.where(kind[:, None] == AFTER, ids(req, after // B) * B + after % B, end)
    src_blk = ids(req, src_pos // B)
    src_blk, src_row, dst, shift = (a[valid] for a in (src_blk, src_pos % B, dst, shift))  # flat, in call order
    heads = (src_blk[:, None] * num_kv_heads + np.arange(num_kv_heads)).reshape(-1)
    rows = np.repeat(src_row, num_kv_heads)
    offsets = np.concatenate(([0], np.cumsum(E)))

    dev = block_table.device
    qsl = np.concatenate(([0], np.cumsum(counts[:n_shared])))
    tokens = np.repeat(first_tok[:n_shared] - qsl[:-1], counts[:n_shared]) + np.arange(qsl[-1])
    in_order = np.array_equal(tokens, np.arange(len(tokens)))  # the batch's first tokens: read and write in place
    tables, vlens = _as_tensor(table, dev, torch.int32), _as_tensor(vlen, dev, torch.int32)
    calls = []
    if n_shared:
        calls.append(KernelCall(
            tokens=None if in_order else _as_tensor(tokens, dev), query_start_loc=_as_tensor(qsl, dev, torch.int32),
            seq_lens=vlens[:n_shared], block_table=tables[:n_shared],
            window=W + G if (kind[:n_shared] != PLAIN).any() else -1,  # (plain rows alone: no window, as stock)
            copies=(0, int(offsets[n_shared])),
        ))  # fmt: skip
    one = torch.tensor([0, 1], dtype=torch.int32, device=dev)
    for r in range(n_shared, len(req)):
        calls.append(KernelCall(
            tokens=_as_tensor(first_tok[r : r + 1], dev), query_start_loc=one, seq_lens=vlens[r : r + 1],
            block_table=tables[r : r + 1], window=W + G, copies=(int(offsets[r]), int(offsets[r + 1])),
            token_start=int(first_tok[r]),
        ))  # fmt: skip
    for call in calls:
        call.scheduler_metadata = scheduler_metadata(
            call.query_start_loc, call.seq_lens, call.window, isa, num_heads, num_kv_heads, head_size, dtype
        )
    if not len(dst):
        return calls, None
    copies = Copies(
        key_heads=_as_tensor(heads, dev), key_rows=_as_tensor(rows, dev),
        value_rows=_as_tensor(heads * (2 * B) + B + rows, dev), slots=_as_tensor(dst, dev),
        shift=_as_tensor(shift, dev),
    )  # fmt: skip
    return calls, copies


def _scratch_blocks(ids, req, counts, i, kind, E, G, B):
    """A scratch block per front row (NULL_BLOCK for the rest), and which front rows are
    left without one: the null block first, then the free tails of the other decode
    rows' last blocks, the most copies to the longest tails."""
    scratch = np.full(len(req), NULL_BLOCK, dtype=np.int64)
    alone = np.zeros(len(req), dtype=bool)
    fronts = np.nonzero(kind == FRONT)[0]
    if not fronts.size:
        return scratch, alone
    hosts = np.nonzero((kind != FRONT) & (counts == 1))[0]
    tail = B - (i[hosts] % B + 1 + np.where(kind[hosts] == AFTER, G, 0))  # free slots after its query and copies
    room = np.concatenate(([B], tail))
    block = np.concatenate(([NULL_BLOCK], ids(req[hosts], (i[hosts] // B)[:, None])[:, 0]))
    by_room = np.argsort(-room, kind="stable")
    k = 0
    for f in fronts[np.argsort(-E[fronts], kind="stable")]:
        if k < len(by_room) and room[by_room[k]] >= E[f]:
            scratch[f] = block[by_room[k]]
            k += 1
        else:  # it fits no tail left (a longer one went to a row with more copies): a call of its own
            alone[f] = True
    return scratch, alone


def plain_call(query_start_loc, seq_lens, block_table, isa, num_heads, num_kv_heads, head_size, dtype):
    """The call for a batch whose every request is a plain row: vLLM's own metadata as it is."""
    qsl, seq = query_start_loc.to(torch.int32), seq_lens.to(torch.int32)
    # Plain rows see all their keys: no window, the kernel's full-attention path as for stock.
    return KernelCall(
        tokens=None, query_start_loc=qsl, seq_lens=seq, block_table=block_table.to(torch.int32), window=-1,
        scheduler_metadata=scheduler_metadata(qsl, seq, -1, isa, num_heads, num_kv_heads, head_size, dtype),
    )  # fmt: skip


def _table_reader(block_table: torch.Tensor):
    # Read only the columns a row needs: a table row is max_model_len / B wide (2^25 at 2^30 tokens).
    whole = block_table.cpu().numpy()  # a view, not a copy

    def ids(reqs, cols):  # block ids at [reqs[r], cols[r, c]]
        return whole[reqs[:, None], np.minimum(cols, whole.shape[1] - 1)]

    return ids


def _as_tensor(a, device, dtype=torch.long):
    return torch.from_numpy(np.array(a)).to(device, dtype)  # (a copy: writable)


def run_calls(
    calls: list[KernelCall],
    copies: Copies | None,  # every call's, gathered and rotated once here
    query: torch.Tensor,  # [T, H, D] the whole batch
    kv_cache: torch.Tensor,
    scale: float,
    rotary: RotarySpec | None,
    isa: str,
    output: torch.Tensor,  # [T, H, D]: the planned rows are written
) -> None:
    staged = _gather(copies, kv_cache, rotary) if copies is not None else None
    for call in calls:
        a, b = call.copies
        if b > a:
            write_kv_kernel(kv_cache, staged[0][a:b], staged[1][a:b], copies.slots[a:b], isa)
        _attend(query, kv_cache, call, scale, output)


def _gather(copies: Copies, kv_cache, rotary):
    """The copies' keys (re-rotated) and values, [N, Hkv, D] each."""
    nb, Hkv, B, two_d = kv_cache.shape
    D = two_d // 2
    # The kernel's layout, per block and head: keys [D, B] (a key is a column), then values [B, D].
    keys = kv_cache.view(nb * Hkv, 2 * D * B)[:, : D * B].view(nb * Hkv, D, B)
    k = keys[copies.key_heads, :, copies.key_rows].view(-1, Hkv, D)
    v = kv_cache.view(-1, D).index_select(0, copies.value_rows).view(-1, Hkv, D)
    if rotary is not None:
        k = copies.rotated(k.float(), rotary).to(k.dtype)
    return k, v


def _attend(query, kv_cache, call: KernelCall, scale, output) -> None:
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
