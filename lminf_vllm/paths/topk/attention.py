"""Top-k attention of docs/topk-contract.md over a paged cache and the host store, in PyTorch.

The engine's math for topk_blocks > 0 (paths/topk/ drives it); the oracle is
testing/topk_reference.py. Three jobs, no vLLM import:
  * summaries of complete blocks (keys rotated back to position 0, min and max);
  * a chunk's selection: its last row's query rotated to position C against its
    middle blocks (topk_score: their attention mass from the keys at position 0,
    or Quest's bound from the summaries; max over the GQA group, the k best,
    lower block first on ties);
  * the chunk's attention: one softmax over what the pool still holds (whole
    global blocks, whole window blocks) and the selected blocks from the store,
    in two branches merged by their log-sum-exps (Span says which): the window
    through vLLM's CPU kernel (window.py, the far branch entering as one virtual
    key) or PyTorch's fused attention; the far branch in PyTorch.

Scores: a key at i - j <= C is read as stored, <q_i, k_j>; one further back is
seen at distance C, <R(C - i) q_i, R(-j) k_j> (rotations compose), the same
rewrite the global branch of SPEC.md uses. Only keys with j < i - C need it:
the global blocks, the old edge of the first window block, the selected blocks.

The index work of a chunk (which pool blocks, which slot each row sees, the
rotation angles) is the same for every layer: `plan_chunk` does it once per
step, `attend_chunk` runs per layer.
"""

from dataclasses import dataclass

import torch

from lminf_vllm.block_policy import first_window_block, global_blocks
from lminf_vllm.config import LminfConfig
from lminf_vllm.kv_layout import block_head_numbers, read_blocks, token_numbers
from lminf_vllm.lambda_attention import _local_mask
from lminf_vllm.rope import RotarySpec, cos_sin, rotate
from lminf_vllm.paths.topk.window import WindowCall, attend_window
from lminf_vllm.paths.topk import mass_kernel, sketch

# Rows of a prefill chunk attended at once (at most; spans also end where the first window block moves).
QUERY_SPAN = 256


class _AngleTable:
    """cos, sin of position * inv_freq for positions [0, n), formed in float64 as rope.cos_sin
    does, kept across steps: every rotation here is a lookup (negative angles by symmetry)."""

    def __init__(self) -> None:
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._keys: dict[int, tuple] = {}  # id(inv_freq) -> (inv_freq, its values): layers share a table

    def key(self, rotary: RotarySpec) -> tuple:
        found = self._keys.get(id(rotary.inv_freq))
        if found is None:
            found = (rotary.inv_freq, (rotary.rotary_dim, tuple(rotary.inv_freq.tolist())))
            self._keys[id(rotary.inv_freq)] = found  # (holding inv_freq keeps its id from being reused)
        return found[1]

    def __call__(self, positions: torch.Tensor, rotary: RotarySpec) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.key(rotary), positions.device.type)
        cos, sin = self._tables.get(key, (None, None))
        need = int(positions.abs().max()) + 1 if positions.numel() else 0
        if cos is None or cos.shape[0] < need:
            size = max(need, 2 * (0 if cos is None else cos.shape[0]), 4096)
            cos, sin = cos_sin(torch.arange(size, device=positions.device), rotary.inv_freq, torch.float32)
            self._tables[key] = (cos, sin)
        c, s = cos[positions.abs()], sin[positions.abs()]
        return c, torch.where((positions < 0)[..., None], -s, s)


angles = _AngleTable()


def _moved(x: torch.Tensor, positions: torch.Tensor, rotary: RotarySpec) -> torch.Tensor:
    """x [N, ..., D] (float32) rotated by positions[N] (one angle per leading row)."""
    cos, sin = angles(positions, rotary)
    shape = (positions.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    return rotate(x, cos.view(shape), sin.view(shape), rotary)


def rotated_to(x: torch.Tensor, positions: torch.Tensor, rotary: RotarySpec) -> torch.Tensor:
    """Keys at position 0, x [..., N, D] (any float dtype), rotated to their positions [..., N]
    (broadcast), in float32: the keys as stored, from the host store's one copy."""
    cos, sin = angles(positions, rotary)
    return rotate(x.float(), cos, sin, rotary)


def block_summaries(keys: torch.Tensor, first_block: int, rotary: RotarySpec):
    """keys [n, B, Hkv, D] of blocks first_block.., rotated at their positions ->
    lo, hi [n, Hkv, D] float32, and the keys rotated back to position 0 [n, B, Hkv, D] float32."""
    n, B, Hkv, D = keys.shape
    pos = torch.arange(first_block * B, (first_block + n) * B, device=keys.device)
    at_zero = _moved(keys.reshape(n * B, Hkv, D).float(), -pos, rotary).view(n, B, Hkv, D)
    return at_zero.amin(dim=1), at_zero.amax(dim=1), at_zero


def select_from_bounds(q_cap: torch.Tensor, bounds, first: int, k: int) -> torch.Tensor:
    """The chunk's selection by Quest's bound (topk_score "bound"): q_cap [H, D] float32, its last
    row's query rotated to position C; bounds the summaries of its candidate blocks
    first .. first + nc - 1 as HostStore.bounds keeps them, [Hkv, 2 D, nc]: hi's channels then
    lo's, so that Quest's bound sum_c max(q_c lo_c, q_c hi_c) = q+ . hi + q- . lo is one matmul
    of [q+, q-] per KV head; or a list of such pieces in block order (the store's chunks).
    -> [Hkv, min(k, nc)] block numbers, ascending per KV head."""
    pieces = bounds if isinstance(bounds, (list, tuple)) else [bounds]
    Hkv, dev = pieces[0].shape[0], pieces[0].device
    nc = sum(p.shape[-1] for p in pieces)
    if nc <= k:  # every candidate
        return torch.arange(first, first + nc, device=dev).expand(Hkv, -1)
    return _top_k_rows(bound_scores(q_cap, pieces)[None], [nc], first, k)[0]


def bound_scores(q_cap: torch.Tensor, pieces: list[torch.Tensor]) -> torch.Tensor:
    """select_from_bounds' score of each candidate: [Hkv, nc], the group's max of Quest's bound."""
    Hkv, D = pieces[0].shape[0], q_cap.shape[-1]
    q = q_cap.view(Hkv, -1, D)
    qq = torch.cat((q.clamp(min=0), q.clamp(max=0)), dim=-1)
    bound = _joined([torch.bmm(qq, p) for p in pieces], -1)  # [Hkv, g, nc]
    return bound.amax(dim=1)  # a block matters if it matters to any head of the group


def _joined(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def select_from_mass(q_cap: torch.Tensor, at_zero, first: int, k: int, scale: float) -> torch.Tensor:
    """The chunk's selection by attention mass (topk_score "mass", the default): q_cap [H, D]
    float32 as for select_from_bounds; at_zero the candidate blocks' keys rotated back to
    position 0 as HostStore.keys_at_zero gives them, [nc, Hkv, B, D] (any dtype, read once), or
    a list of such pieces in block order (the store's chunks).

    Per query head, a block's score is the log-sum-exp over its tokens of scale * q_cap . u_j,
    the exact score of each token at distance C; minus the log-sum-exp over every candidate
    token, it is the log of the block's share of that head's softmax with every candidate
    visible at C. A KV head takes the max of its query heads' shares (heads are comparable
    as shares, not as raw scores): the k best, the lower block on ties.
    -> [Hkv, min(k, nc)] block numbers, ascending per KV head."""
    pieces = at_zero if isinstance(at_zero, (list, tuple)) else [at_zero]
    Hkv, dev = pieces[0].shape[1], pieces[0].device
    nc = sum(p.shape[0] for p in pieces)
    if nc <= k:  # every candidate
        return torch.arange(first, first + nc, device=dev).expand(Hkv, -1)
    return _top_k_rows(mass_scores(q_cap, pieces, scale)[None], [nc], first, k)[0]


def mass_scores(q_cap: torch.Tensor, pieces: list[torch.Tensor], scale: float) -> torch.Tensor:
    """select_from_mass' score of each candidate: [Hkv, nc], the group's max of the log shares."""
    return mass_scores_rows(q_cap[None], [pieces], scale)[0]


def mass_scores_rows(q_caps: torch.Tensor, rows: list[list[torch.Tensor]], scale: float) -> torch.Tensor:
    """mass_scores of several rows at once: q_caps [R, H, D], rows[r] row r's pieces (at least one)
    -> [R, Hkv, C], C the most candidates of a row, -inf past a row's own."""
    R, H, D = q_caps.shape
    _, Hkv, B, _ = rows[0][0].shape
    if mass_kernel.usable(rows[0][0].dtype) and q_caps.device.type == "cpu":  # one C++ pass (mass_kernel.py)
        return mass_kernel.block_shares(rows, q_caps.view(R, Hkv, -1, D), scale)
    counts = [sum(p.shape[0] for p in pieces) for pieces in rows]
    block = torch.full((R, Hkv, H // Hkv, max(counts)), float("-inf"), device=q_caps.device)
    for r, pieces in enumerate(rows):
        block[r, ..., : counts[r]] = _block_lse_eager(q_caps[r], pieces, scale)
    share = block - torch.logsumexp(block, dim=-1, keepdim=True)  # log of each block's share, per query head
    return share.amax(dim=2)


def sketch_scores_rows(q_caps: torch.Tensor, rows: list[list[tuple[torch.Tensor, torch.Tensor]]],
                       scale: float) -> torch.Tensor:  # fmt: skip
    """mass_scores_rows from the keys' 8-bit copy (topk_score "mass_int8"): rows[r] row r's pieces as
    HostStore.sketch_at_zero gives them; the query rounded per head (sketch.py). -> [R, Hkv, C]."""
    R, H, D = q_caps.shape
    _, Hkv, B, _ = rows[0][0][0].shape
    q = q_caps.float().view(R, Hkv, H // Hkv, D)
    if mass_kernel.sketch_usable(H // Hkv, B, D) and q_caps.device.type == "cpu":  # one VNNI pass (mass_kernel.py)
        return mass_kernel.sketch_shares(rows, q, scale)
    counts = [sum(k.shape[0] for k, _ in pieces) for pieces in rows]
    block = torch.full((R, Hkv, H // Hkv, max(counts)), float("-inf"), device=q_caps.device)
    q8, qs = sketch.sketch_query(q)
    for r, pieces in enumerate(rows):
        block[r, ..., : counts[r]] = sketch.block_lse_eager(q8[r], qs[r], pieces, scale)
    share = block - torch.logsumexp(block, dim=-1, keepdim=True)
    return share.amax(dim=2)


def _block_lse_eager(q_cap: torch.Tensor, pieces: list[torch.Tensor], scale: float) -> torch.Tensor:
    """[Hkv, g, nc]: each candidate block's log-sum-exp per query head, by PyTorch's eager ops."""
    _, Hkv, B, D = pieces[0].shape
    nc = sum(p.shape[0] for p in pieces)
    keys = _WORKSPACE.take(Hkv * nc * B * D, pieces[0].device).view(Hkv, nc, B, D)
    a = 0
    for p in pieces:  # per KV head, float32: one pass over the keys
        keys[:, a : a + p.shape[0]].copy_(p.transpose(0, 1))
        a += p.shape[0]
    keys = keys.view(Hkv, nc * B, D)
    s = torch.bmm(q_cap.view(Hkv, -1, D), keys.transpose(1, 2)).mul_(scale)  # [Hkv, g, nc * B]
    return torch.logsumexp(s.view(Hkv, -1, nc, B), dim=-1)


class _Workspace:
    """One float32 buffer for the mass score's keys, kept across layers and steps: a new tensor of
    a row's middle keys per call (MBs at 16k) is mapped afresh by the allocator, and its page
    faults cost more than the copy into it (3.6 against 1.2 ms a row and layer at 16k, B = 128)."""

    def __init__(self) -> None:
        self.buf = torch.empty(0)

    def take(self, n: int, device) -> torch.Tensor:
        # (a buffer made under inference mode, as the engine runs, cannot be written outside it)
        if (self.buf.numel() < n or self.buf.device != torch.device(device)
                or self.buf.is_inference() != torch.is_inference_mode_enabled()):  # fmt: skip
            self.buf = torch.empty(n, device=device)
        return self.buf[:n]


_WORKSPACE = _Workspace()


def _top_k_rows(score: torch.Tensor, counts: list[int], first: int, k: int) -> list[torch.Tensor]:
    """The k best candidates of each row and KV head: score [R, Hkv, n] (row r's candidates in its
    first counts[r] columns, block numbers first + column) -> per row [Hkv, min(k, counts[r])] block
    numbers, ascending; the lower block on ties (the contract's rule; topk alone may take either)."""
    R, Hkv, n = score.shape
    picks: list = [None] * R
    ranked = [r for r in range(R) if counts[r] > k]
    if ranked:
        sc = score[ranked]  # [R', Hkv, n]: columns past a row's count are -inf, never among its k + 1 best
        best, order = torch.topk(sc, k + 1, dim=-1)
        if bool((best[..., k - 1] == best[..., k]).any()):  # a tie at the k-th place: the lower block
            order = torch.sort(sc, dim=-1, descending=True, stable=True).indices
        chosen = order[..., :k].sort(dim=-1).values + first
        for j, r in enumerate(ranked):
            picks[r] = chosen[j]
    for r in range(R):
        if picks[r] is None:  # every candidate
            picks[r] = torch.arange(first, first + counts[r], device=score.device).expand(Hkv, -1)
    return picks


def select_stored_rows(store, rows: list[tuple[str, int]], layer, q_caps: torch.Tensor, first: int,
                       cfg: LminfConfig, scale: float, memo: bool = True) -> list[torch.Tensor]:  # fmt: skip
    """select_stored for every decode row of a step in one layer: rows [(request, stop)], q_caps
    [R, H, D]. Where a C++ pass serves the mass, one call scores and ranks every row
    (_select_by_pass); else each row's score reads its own candidates (its keys, or the bound's
    summaries) and the ranking (top-k, ties, order) is one op for all rows.
    -> per row [Hkv, min(k, stop - first)], ascending, as select_stored gives it."""
    k, counts = cfg.topk_blocks, [stop - first for _, stop in rows]
    by_pass = _select_by_pass(store, rows, layer, q_caps, first, cfg, scale, memo)
    if by_pass is not None:
        return [by_pass[r, :, : min(k, counts[r])] for r in range(len(rows))]
    scoring = [r for r in range(len(rows)) if counts[r] > k]  # (the others read every candidate)
    if not scoring:
        Hkv = store.bounds(rows[0][0], layer, first, first + 1)[0].shape[0]  # (a decode row has >= 1 candidate)
        return _top_k_rows(torch.empty(len(rows), Hkv, 0), counts, first, k)
    if cfg.topk_score == "bound":
        s = [bound_scores(q_caps[r], store.bounds(rows[r][0], layer, first, rows[r][1])) for r in scoring]
    elif cfg.topk_score == "mass_int8":  # every scoring row's 8-bit keys in one pass
        sketches = [store.sketch_at_zero(rows[r][0], layer, first, rows[r][1]) for r in scoring]
        s = sketch_scores_rows(q_caps[scoring], sketches, scale)
    else:  # every scoring row's keys in one pass
        keys = [store.keys_at_zero(rows[r][0], layer, first, rows[r][1]) for r in scoring]
        s = mass_scores_rows(q_caps[scoring], keys, scale)
    if len(scoring) == len(rows) and isinstance(s, torch.Tensor):  # (mass: -inf past each row's candidates)
        return _top_k_rows(s, counts, first, k)
    score = torch.full((len(rows), s[0].shape[0], max(counts)), float("-inf"), device=q_caps.device)
    for j, r in enumerate(scoring):
        score[r, :, : counts[r]] = s[j][:, : counts[r]]
    return _top_k_rows(score, counts, first, k)


def _select_by_pass(store, rows: list[tuple[str, int]], layer, q_caps: torch.Tensor, first: int, cfg: LminfConfig,
                    scale: float, memo: bool) -> torch.Tensor | None:  # fmt: skip
    """select_stored_rows by the mass through one C++ pass that scores and ranks (mass_kernel.select),
    its address table memo'd by the store where `memo` (a decode step's rows; a prefill chunk's
    blocks are new each time): [R, Hkv, k]. None where no pass serves (the bound, another device, a
    shape or dtype the pass is not built for)."""
    if cfg.topk_score == "bound" or q_caps.device.type != "cpu":
        return None
    R, H, D = q_caps.shape
    int8 = cfg.topk_score == "mass_int8"
    Hkv, B, dtype = store.block_shape(rows[0][0], layer)
    if not (mass_kernel.sketch_usable(H // Hkv, B, D) if int8 else mass_kernel.usable(dtype)):
        return None
    read = store.sketch_at_zero if int8 else store.keys_at_zero
    make = lambda: mass_kernel.table_of([read(request, layer, first, stop) for request, stop in rows])  # noqa: E731
    table = store.memo((cfg.topk_score, first), layer, rows, make) if memo else make()
    return mass_kernel.select(table, q_caps.view(R, Hkv, H // Hkv, D), scale, first, cfg.topk_blocks)


def select_decode_rows(store, rows: list[tuple[str, int, int]], layer, q_caps: torch.Tensor, first: int,
                       cfg: LminfConfig, scale: float) -> list[torch.Tensor]:  # fmt: skip
    """The selections of a step's decode rows [(request, stop, i)] in one layer: a row keeps its
    request's last selection where the contract's topk_refresh rule lets it (kept_selection), the
    others score anew (select_stored_rows, together) and are kept for the rows after them."""
    if cfg.topk_refresh == 1:  # (the default: every row scores, nothing to keep)
        return select_stored_rows(store, [row[:2] for row in rows], layer, q_caps, first, cfg, scale)
    picks = [kept_selection(store, request, layer, i, min(cfg.topk_blocks, stop - first), cfg)
             for request, stop, i in rows]  # fmt: skip
    fresh = [r for r, p in enumerate(picks) if p is None]
    if fresh:
        got = select_stored_rows(store, [rows[r][:2] for r in fresh], layer, q_caps[fresh], first, cfg, scale)
        for r, chosen in zip(fresh, got):
            picks[r] = chosen
            store.keep(rows[r][0], layer, rows[r][2], chosen)
    return picks


def kept_selection(store, request: str, layer, i: int, need: int, cfg: LminfConfig) -> torch.Tensor | None:
    """The selection a decode row at i reads without scoring: its request's last one (store.kept)
    while the row that scored it is fewer than topk_refresh positions back and it holds every block
    i may read, need = min(k, |M(i)|); else None (the row scores)."""
    kept = store.kept(request, layer)
    if kept is None:
        return None
    row, chosen = kept
    return chosen if 0 < i - row < cfg.topk_refresh and chosen.shape[1] >= need else None


def select_stored(store, request: str, layer: int, q_cap: torch.Tensor, first: int, stop: int, cfg: LminfConfig,
                  scale: float) -> torch.Tensor:  # fmt: skip
    """A chunk's selection among the stored blocks [first, stop) by cfg.topk_score, read from the
    host store (store.HostStore): the bound from its summaries, the mass from its keys at
    position 0. -> [Hkv, min(k, stop - first)], ascending."""
    if cfg.topk_score == "bound":
        return select_from_bounds(q_cap, store.bounds(request, layer, first, stop), first, cfg.topk_blocks)
    if cfg.topk_score == "mass_int8":  # (the decode rows' way, for one row)
        return select_stored_rows(store, [(request, stop)], layer, q_cap[None], first, cfg, scale, memo=False)[0]
    return select_from_mass(q_cap, store.keys_at_zero(request, layer, first, stop), first, cfg.topk_blocks, scale)


@dataclass
class Span:
    """Rows [a, b) of a chunk and what they read from the pool: the same for every layer.

    The slots read are the global blocks before the window blocks, then the window blocks
    from fa on, positions ascending. Two branches share one softmax (merged by their
    log-sum-exps): the window branch, Λ's local keys (0 <= i - j < W) through vLLM's CPU
    kernel (window.py) or PyTorch's fused CPU attention, is the slots from `win` on; the far
    branch, every other visible key
    (i - j >= W: whole global blocks, the old edge of the first window block, selected
    blocks), is the slots before `far_end`, plus the selected blocks from the store."""

    a: int
    b: int
    rows: torch.Tensor  # [T'] positions a .. b-1
    blocks: torch.Tensor  # [nb] physical ids of the blocks read
    pos: torch.Tensor  # [L] positions of the slots read (the last block's unwritten tail is cut)
    logical: torch.Tensor  # [L] their logical blocks
    win: int  # window branch: slots [win, L), position a - W + 1 on
    far_end: int  # far branch: slots [0, far_end), positions up to b - 1 - W
    far_seen: torch.Tensor  # [T', far_end] whole global and window blocks at i - j >= W
    fa: int  # first window block of row a: selected blocks before it come from the store
    n_far: int  # the first n_far slots are read past the cap (i - j > C) by some row
    q_cap: torch.Tensor | None  # [T', D, D]: row t rotated to position C is q_t @ q_cap[t] (None: no row needs it)
    k_zero: torch.Tensor | None  # [n_far, D, D]: the far slots rotated back to position 0, likewise
    # The short far branch (`_far_short_spans`), where C = W and every row sees the whole global
    # blocks and has the same first window block fa: its far keys are the global slots, the
    # selected blocks before fa and the edge, the slots of block fa, of which row a + t sees the
    # first edge_from + t.
    short: bool = False
    edge_from: int = 0
    n_glob: int = 0  # gB: the global slots
    # cos, sin that rotate the rows to C and the global slots back to position 0
    # (elementwise: cheaper than q_cap's matrices over a long chunk; q_cap keeps the last row's)
    cap_angles: tuple | None = None
    glob_angles: tuple | None = None  # (one pair for every span of the chunk)
    batch: "ShortSpans | None" = None  # on a chunk's first short span: what all of them read alike (once per step)


def plan_chunk(s: int, e: int, block_row: torch.Tensor, cfg: LminfConfig, B: int, rotary: RotarySpec,
               head_size: int) -> list[Span]:  # fmt: skip
    """The spans of chunk rows [s, e) of one request with block table block_row."""
    g, W, C = global_blocks(cfg.global_tokens, B), cfg.local_tokens, cfg.distance_cap
    dev = block_row.device
    selects = first_window_block(e - 1, W, B) > g  # the chunk has middle blocks: its store keys are seen at C
    spans = []
    glob_angles = angles(-torch.arange(g * B, device=dev), rotary) if C == W else None
    for a, b in span_bounds(s, e, W, B):
        fa = first_window_block(a, W, B)
        blocks = torch.cat((torch.arange(min(g, fa), device=dev), torch.arange(fa, (b - 1) // B + 1, device=dev)))
        tail = (b - 1) // B * B + B - b  # unwritten slots of the last block
        pos = (blocks[:, None] * B + torch.arange(B, device=dev)).flatten()[: len(blocks) * B - tail]
        rows = torch.arange(a, b, device=dev)
        logical = pos // B
        far_end = int((pos <= b - 1 - W).sum())  # ascending: prefixes and a suffix
        fwb = (rows - W + 1).clamp(min=0) // B
        p, lg = pos[None, :far_end], logical[None, :far_end]
        far_seen = (p <= rows[:, None] - W) & ((lg < g) | (lg >= fwb[:, None]))
        n_far = int((pos < b - 1 - C).sum())
        short = C == W and fa >= g and a - W + 1 >= g * B  # (spans never straddle a change of fa)
        sp = Span(a, b, rows, block_row[blocks].long(), pos, logical, int((pos < max(0, a - W + 1)).sum()),
                  far_end, far_seen, fa, n_far,
                  rotations(C - (rows[-1:] if short else rows), rotary, head_size)
                  if n_far or selects or short else None,
                  rotations(-pos[:n_far], rotary, head_size) if not short else None)  # fmt: skip
        if short:
            sp.short, sp.edge_from, sp.n_glob, sp.glob_angles = True, a - W + 1 - fa * B, g * B, glob_angles
            sp.cap_angles = angles(C - rows, rotary)
        spans.append(sp)
    return spans


def span_bounds(s: int, e: int, W: int, B: int) -> list[tuple[int, int]]:
    """Rows [s, e) in spans of at most QUERY_SPAN rows that never straddle a change of the
    first window block (rows i with (i - W + 1) % B = 0 start one): a span's rows then share
    their global and window blocks, and its edge is less than one block."""
    bounds, a = [], s
    while a < e:
        change = W - 1 + (max(0, a - W + 1) // B + 1) * B  # the next row whose first window block moves
        b = min(e, a + QUERY_SPAN, change)
        bounds.append((a, b))
        a = b
    return bounds


def rotations(positions: torch.Tensor, rotary: RotarySpec, head_size: int) -> torch.Tensor:
    """[N, D, D]: x rotated by positions[n] is x @ M[n] (rope.rotate is linear: row d of M is the
    d-th unit vector rotated). One matmul per layer instead of rope.rotate's dozen small ops."""
    cos, sin = angles(positions, rotary)
    eye = torch.eye(head_size, device=positions.device).expand(len(positions), -1, -1)
    return rotate(eye, cos[:, None], sin[:, None], rotary)


def attend_chunk(
    q: torch.Tensor,  # [T, H, D] rows s .. s + T - 1, rotated at their positions
    spans: list[Span],
    kv_cache: torch.Tensor,
    layout: str,
    chosen: torch.Tensor,  # [Hkv, k] the chunk's selected blocks (k may be 0)
    store_kv: tuple | None,  # their keys at position 0 and values, [Hkv, k * B, D] each (None when k = 0)
    cfg: LminfConfig,
    scale: float,
    rotary: RotarySpec,
    window: WindowCall | None = None,  # the window branch through vLLM's kernel (window.plan_window), else PyTorch's
) -> torch.Tensor:
    """Top-k attention of one chunk. -> [T, H, Dv] float32."""
    T, H, D = q.shape
    B, W = kv_cache.shape[2], cfg.local_tokens
    Hkv, g = kv_cache.shape[1], H // kv_cache.shape[1]
    s = spans[0].a
    chunk = _ChunkKeys(chosen, store_kv, B)
    short = [sp for sp in spans if sp.short]  # (a suffix of the spans: fa only grows)
    if short:  # their far branch, all at once (_far_short_spans)
        at = short[0].a - s
        o_short, lse_short = _far_short_spans(q[at : short[-1].b - s], short, kv_cache, layout, chunk, scale, rotary)
    if window is not None:  # the far branch of every span first: the kernel's window call takes its log-sum-exps
        o_far = torch.zeros(T, Hkv, g, kv_cache.shape[-1] // 2)
        lse_far = torch.full((T, Hkv, g, 1), float("-inf"))
        if short:
            o_far[at:], lse_far[at:] = o_short, lse_short
        for sp in spans:
            if sp.short or not (sp.far_end or chosen.numel()):
                continue
            # only the blocks of the far slots
            kv = read_blocks(kv_cache, sp.blocks[: -(-sp.far_end // B)], layout).reshape(-1, Hkv, kv_cache.shape[-1])
            qf = q[sp.a - s : sp.b - s].float().view(sp.b - sp.a, Hkv, g, D)
            rows = slice(sp.a - s, sp.b - s)
            o_far[rows], lse_far[rows] = _far_general(qf, sp, kv, chunk, cfg, scale, rotary)
        return attend_window(window, q, kv_cache, layout, o_far.view(T, H, -1), lse_far.view(T, H), scale)
    out = torch.empty(T, H, kv_cache.shape[-1] // 2)
    for sp in spans:
        t = sp.b - sp.a
        kv = read_blocks(kv_cache, sp.blocks, layout).reshape(-1, Hkv, kv_cache.shape[-1])[: len(sp.pos)]
        q_span = q[sp.a - s : sp.b - s]
        # Window branch: the query heads of a KV head become extra query rows (GQA without copying keys).
        rows = q_span.view(t, Hkv, g, D).permute(1, 2, 0, 3).reshape(1, Hkv, g * t, D)
        k_w, v_w = kv[sp.win :, :, :D].transpose(0, 1)[None], kv[sp.win :, :, D:].transpose(0, 1)[None]
        mask = None if t == 1 else _local_mask(t, len(sp.pos) - sp.win, sp.a - int(sp.pos[sp.win]), W, g, q.device)
        o_w, lse_w = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            rows, k_w.to(rows.dtype), v_w.to(rows.dtype), 0.0, False, attn_mask=mask, scale=scale
        )[:2]
        o_w = o_w.view(Hkv, g, t, -1).permute(2, 0, 1, 3).float()  # [t, Hkv, g, Dv]
        lse_w = lse_w.view(Hkv, g, t).permute(2, 0, 1)[..., None]
        if not (sp.far_end or chosen.numel()):
            out[sp.a - s : sp.b - s] = o_w.reshape(t, H, -1)
            continue
        if sp.short:
            o_f, lse_f = o_short[sp.a - s - at : sp.b - s - at], lse_short[sp.a - s - at : sp.b - s - at]
        else:
            o_f, lse_f = _far_general(q_span.float().view(t, Hkv, g, D), sp, kv, chunk, cfg, scale, rotary)
        top = torch.maximum(lse_w, lse_f)  # finite: every row sees its own key
        w_w, w_f = torch.exp(lse_w - top), torch.exp(lse_f - top)
        out[sp.a - s : sp.b - s] = ((o_w * w_w + o_f * w_f) / (w_w + w_f)).reshape(t, H, -1)
    return out


class _ChunkKeys:
    """What every span of a chunk reads alike: its selected blocks from the store (keys at
    position 0, values, positions) and, for the short way, the global slots at position 0."""

    def __init__(self, chosen: torch.Tensor, store_kv: tuple | None, B: int):
        self.chosen, self.B = chosen, B
        if chosen.numel():
            self.st_zero, self.v_st = (t.float() for t in store_kv)
            self.pos_st = (chosen[:, :, None] * B + torch.arange(B, device=chosen.device)).flatten(1)  # [Hkv, k * B]
            self.store_dtype = store_kv[0].dtype
        self.k_st = None  # the keys as stored, rotated from st_zero where some row reads them so
        self.uniform = None  # (keys [Hkv, L, D], values [Hkv, L, Dv]) of the short way: global slots, picks

    def uniform_keys(self, sp: Span, kv_cache: torch.Tensor, layout: str, rotary: RotarySpec):
        """The short way's keys every row of a chunk's short spans may see: the global slots
        rotated back to position 0, then the selected blocks ([Hkv, Lu, D], [Hkv, Lu, Dv] in the
        cache's dtype)."""
        if self.uniform is None:
            n, D = sp.n_glob, kv_cache.shape[-1] // 2
            kv = read_blocks(kv_cache, sp.blocks[: n // self.B], layout).float().reshape(n, *kv_cache.shape[1::2])
            cos, sin = sp.glob_angles
            keys = rotate(kv[..., :D], cos[:, None], sin[:, None], rotary).transpose(0, 1)  # [Hkv, gB, D]
            values = kv[..., D:].transpose(0, 1)
            if self.chosen.numel():
                keys, values = torch.cat((keys, self.st_zero), dim=1), torch.cat((values, self.v_st), dim=1)
            self.uniform = (keys.to(kv_cache.dtype), values.to(kv_cache.dtype))
        return self.uniform


@dataclass
class ShortSpans:
    """What the far branch of a chunk's short spans reads alike in every layer (`_far_short_spans`):
    the spans are a batch of `ns` query sets padded to `tmax` rows each."""

    take: torch.Tensor  # [ns * tmax] the short row each padded row copies (padding repeats a span's last)
    keep: torch.Tensor  # [T'] the padded rows that are real, in order
    cap_angles: tuple  # cos, sin [T'] that rotate the short rows to C
    fa_blocks: torch.Tensor  # [ns] physical id of each span's first window block
    fa_first: torch.Tensor  # [ns] its first position (picks from there on are late: in the rows' windows or edges)
    edge_angles: tuple  # cos, sin [ns, B]: block fa's slots rotated back to position 0
    edge_mask: torch.Tensor  # [ns, 1, g * tmax, B]: 0 where a row sees an edge slot, else -inf (slot 0 if none)
    edge_sees: torch.Tensor  # [ns, 1, g * tmax, 1] bool: the row sees some edge slot


def plan_short_spans(spans: list[Span], B: int, g: int, rotary: RotarySpec, dtype: torch.dtype) -> ShortSpans:
    """ShortSpans of a chunk's short spans (a run of them, rows ascending), g query heads per KV head."""
    dev = spans[0].rows.device
    t = torch.tensor([sp.b - sp.a for sp in spans], device=dev)
    starts, tmax = torch.cumsum(t, 0) - t, int(t.max())
    u = torch.arange(tmax, device=dev)
    used = torch.minimum(u[None, :], (t - 1)[:, None])  # [ns, tmax]
    fa = torch.tensor([sp.fa for sp in spans], device=dev)
    edge_from = torch.tensor([sp.edge_from for sp in spans], device=dev)
    sees = torch.arange(B, device=dev)[None, None, :] < (edge_from[:, None] + used)[..., None]  # [ns, tmax, B]
    edge_sees = sees.any(-1)  # [ns, tmax]
    sees[..., 0] |= ~edge_sees
    mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, float("-inf"))
    return ShortSpans(
        take=(starts[:, None] + used).flatten(),
        keep=(torch.arange(len(spans), device=dev)[:, None] * tmax + u[None, :])[u[None, :] < t[:, None]],
        cap_angles=tuple(torch.cat(x) for x in zip(*(sp.cap_angles for sp in spans))),
        fa_blocks=torch.stack([sp.blocks[spans[0].n_glob // B] for sp in spans]),
        fa_first=fa * B,
        edge_angles=angles(-(fa[:, None] * B + torch.arange(B, device=dev)), rotary),
        edge_mask=mask[:, None, None].expand(-1, -1, g, -1, -1).reshape(len(spans), 1, g * tmax, B),
        edge_sees=edge_sees[:, None, None].expand(-1, -1, g, -1).reshape(len(spans), 1, g * tmax, 1),
    )


def _far_short_spans(q: torch.Tensor, spans: list[Span], kv_cache: torch.Tensor, layout: str, chunk: _ChunkKeys,
                     scale: float, rotary: RotarySpec):  # fmt: skip
    """The far branch of a chunk's short spans (Span.short: C = W, so every far key is at distance
    C and is scored by the rows' queries rotated to C against keys at position 0), the spans a
    batch of query sets (padded to the longest), in two calls of PyTorch's fused attention joined
    by their log-sum-exps: the edges, where a span's rows read the slots of its block fa, row
    a + t the first edge_from + t; and the chunk's uniform keys, the global slots and the selected
    blocks, read alike by every row but the picks at or past its span's fa (in its window or edge:
    masked per span). q [T', H, D]: the spans' rows, rotated at their positions. -> outputs
    [T', Hkv, g, Dv] float32, log-sum-exps [T', Hkv, g, 1] (-inf where a row sees none)."""
    T, H, D = q.shape
    B, Hkv, dtype = kv_cache.shape[2], kv_cache.shape[1], kv_cache.dtype
    g, ns = H // Hkv, len(spans)
    plan = spans[0].batch
    if plan is None:
        plan = spans[0].batch = plan_short_spans(spans, B, g, rotary, dtype)
    tmax = plan.edge_mask.shape[2] // g
    cos, sin = plan.cap_angles
    q_cap = rotate(q.float(), cos[:, None], sin[:, None], rotary).to(dtype)[plan.take]  # [ns * tmax, H, D]
    rows = q_cap.view(ns, tmax, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(ns, Hkv, g * tmax, D)
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    edge = read_blocks(kv_cache, plan.fa_blocks, layout).float()  # [ns, B, Hkv, 2D]
    cos, sin = plan.edge_angles
    k_e = rotate(edge[..., :D], cos[:, :, None], sin[:, :, None], rotary).transpose(1, 2).to(dtype)
    o, lse = sdpa(rows, k_e, edge[..., D:].transpose(1, 2).to(dtype), 0.0, False,
                  attn_mask=plan.edge_mask.expand(-1, Hkv, -1, -1), scale=scale)[:2]  # fmt: skip
    o, lse = o.float(), lse.view(ns, Hkv, g * tmax, 1).masked_fill(~plan.edge_sees, float("-inf"))
    if spans[0].n_glob or chunk.chosen.numel():
        keys, values = chunk.uniform_keys(spans[0], kv_cache, layout, rotary)  # [Hkv, Lu, D]
        mask, sees = None, None
        if chunk.chosen.numel():
            late = chunk.pos_st[None] >= plan.fa_first[:, None, None]  # [ns, Hkv, kB]
            if late.any():
                seen = torch.ones(ns, Hkv, 1, keys.shape[1], dtype=torch.bool)
                seen[..., spans[0].n_glob :] = ~late[:, :, None]
                sees = seen.any(-1, keepdim=True)  # [ns, Hkv, 1, 1]
                seen[..., 0] |= ~sees[..., 0]  # (a head that sees none reads one key; its lse is set to -inf)
                mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf"))
                mask = mask.expand(-1, -1, g * tmax, -1)
        o_u, lse_u = sdpa(rows, keys.expand(ns, -1, -1, -1), values.expand(ns, -1, -1, -1), 0.0, False,
                          attn_mask=mask, scale=scale)[:2]  # fmt: skip
        lse_u = lse_u[..., None] if sees is None else lse_u[..., None].masked_fill(~sees, float("-inf"))
        # (merge_two's weight, a sigmoid of the difference, is NaN where neither part sees a key: G = 0,
        # every pick late, an empty edge; the clamped share here is 0 there)
        both = torch.logaddexp(lse, lse_u)
        o, lse = o_u.float().lerp_(o, torch.exp(lse - both.clamp(min=-1e30))), both  # (weights: the edge's share)
    o = o.view(ns, Hkv, g, tmax, -1).permute(0, 3, 1, 2, 4).reshape(ns * tmax, Hkv, g, -1)[plan.keep]
    return o, lse.view(ns, Hkv, g, tmax).permute(0, 3, 1, 2).reshape(ns * tmax, Hkv, g, 1)[plan.keep]


def _far_general(qf: torch.Tensor, sp: Span, kv: torch.Tensor, chunk: _ChunkKeys, cfg: LminfConfig, scale: float,
                 rotary: RotarySpec):  # fmt: skip
    """The far branch of any span: every visible key at i - j >= W, at distance min(i - j, C),
    one float32 softmax. -> outputs [t, Hkv, g, Dv] float32, log-sum-exps [t, Hkv, g, 1] (-inf
    where a row sees no far key)."""
    t, Hkv, g, D = qf.shape
    B, W, C = chunk.B, cfg.local_tokens, cfg.distance_cap
    chosen = chunk.chosen
    far = kv[: sp.far_end].float()
    k_far, values = far[..., :D], far[..., D:].transpose(0, 1)  # values per head: [Hkv, Lf, Dv]
    q_cap = None if sp.q_cap is None else torch.matmul(qf.view(t, -1, D), sp.q_cap).view(qf.shape)
    scores = torch.einsum("tkgd,lkd->tkgl", qf, k_far)
    if sp.n_far:  # slots some row sees past the cap: <R(C - i) q_i, R(-j) k_j> there
        past = (sp.rows[:, None] - sp.pos[None, : sp.n_far]) > C
        capped = torch.einsum("tkgd,lkd->tkgl", q_cap, torch.matmul(k_far[: sp.n_far], sp.k_zero))
        scores[..., : sp.n_far] = torch.where(past[:, None, None, :], capped, scores[..., : sp.n_far])
    seen = sp.far_seen[:, None, :]
    if chosen.numel():
        pos_st = chunk.pos_st
        # selected blocks the pool still holds (a long chunk's own past), beyond each row's window
        picked = (sp.logical[None, : sp.far_end, None] == chosen[:, None, :]).any(-1)  # [Hkv, Lf]
        seen = seen | (picked[None] & (sp.pos[None, None, : sp.far_end] <= sp.rows[:, None, None] - W))
        # the others come from the store: all before the rows' windows, all at i - j >= W
        s_st = torch.einsum("tkgd,kld->tkgl", q_cap, chunk.st_zero)
        if sp.a - int(pos_st.max()) <= C:  # some pair within the cap (C > W): read as stored there
            if chunk.k_st is None:
                chunk.k_st = rotated_to(chunk.st_zero, pos_st, rotary)
            near = (sp.rows[:, None, None] - pos_st[None]) <= C  # [T', Hkv, kB]
            s_st = torch.where(near[:, :, None, :], torch.einsum("tkgd,kld->tkgl", qf, chunk.k_st), s_st)
        from_store = (pos_st < sp.fa * B)[None].expand(t, -1, -1)  # [T', Hkv, kB]
        scores = torch.cat((scores, s_st), dim=-1)
        seen = torch.cat((seen.expand(-1, Hkv, -1), from_store), dim=-1)
        values = torch.cat((values, chunk.v_st), dim=1)
    scores = (scores * scale).masked_fill(~seen[:, :, None, :], float("-inf"))
    lse_f = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf where a row sees no far key
    o_f = torch.einsum("tkgl,kld->tkgd", torch.exp(scores - lse_f.clamp(min=-1e30)), values)
    return o_f, lse_f


@dataclass
class DecodeRow:
    """A decode row at position i whose step selects (the first window block fa is past the
    global blocks), read the fast way by `attend_decode`: the window is exactly the W pool
    slots i - W + 1 .. i, read as stored; every other key it sees (whole global blocks, the
    rows of block fa before the window, the selected blocks) comes from the host store, which
    holds them rotated back to position 0, so one matmul with the query rotated to C scores
    them. The same for every layer: made once per step."""

    i: int
    window_rows: torch.Tensor  # [Hkv * nw] rows (block * Hkv + head) of the cache viewed [blocks * Hkv, B, 2D]:
    # per KV head, its slices of logical blocks fa .. i // B
    start: int  # the window's first slot in them: (i - W + 1) - fa * B, also block fa's rows before it
    fa: int
    far_blocks: torch.Tensor  # [Hkv, g + 1] logical blocks read from the store before the selected ones: 0 .. g - 1, fa
    q_cap: torch.Tensor  # [D, D]: the row's query rotated to position C is q @ q_cap
    window_tokens: torch.Tensor  # [W] its window slots as rows `block * Hkv * B + slot` (the cache viewed per
    # token, kv_layout.token_views: vLLM's decode op reads the window in place through them)
    window_segments: torch.Tensor  # [nw, 3] the same slots per block, (physical block, first slot, count): far_kernel's


def decodes_fast(i: int, cfg: LminfConfig, B: int) -> bool:
    """Does a decode row at i take attend_decode? Where its first window block fa is past the
    global blocks (the step selects) and complete (so in the store: not so only when W < B)."""
    fa = first_window_block(i, cfg.local_tokens, B)
    return fa > global_blocks(cfg.global_tokens, B) and (fa + 1) * B <= i + 1


def plan_decode(i: int, block_row: torch.Tensor, cfg: LminfConfig, B: int, num_kv_heads: int, rotary: RotarySpec,
                head_size: int) -> DecodeRow | None:  # fmt: skip
    """The fast way for a decode row at i, or None where it does not apply (decodes_fast)."""
    if not decodes_fast(i, cfg, B):
        return None
    g, W = global_blocks(cfg.global_tokens, B), cfg.local_tokens
    fa = first_window_block(i, W, B)
    dev = block_row.device
    rows = block_head_numbers(block_row[fa : i // B + 1], num_kv_heads).flatten()
    far = torch.cat((torch.arange(g, device=dev), torch.tensor([fa], device=dev))).expand(num_kv_heads, -1)
    q_cap = rotations(torch.tensor([cfg.distance_cap - i], device=dev), rotary, head_size)[0]
    pos = torch.arange(i - W + 1, i + 1, device=dev)
    tokens = token_numbers(block_row[pos // B], pos % B, num_kv_heads, B)
    starts = torch.arange(fa, i // B + 1, device=dev) * B  # each window block's first position, then its slice
    lo, hi = starts.clamp(min=i - W + 1), (starts + B).clamp(max=i + 1)
    segments = torch.stack((block_row[fa : i // B + 1].long(), lo - starts, hi - lo), dim=1)
    return DecodeRow(i, rows, i - W + 1 - fa * B, fa, far, q_cap, tokens, segments)


def attend_decode(
    q: torch.Tensor,  # [H, D] float32, rotated at position row.i
    q_cap: torch.Tensor,  # [H, D] the same query rotated to position C
    row: DecodeRow,
    kv_cache: torch.Tensor,  # OWN_LAYOUT [num_blocks, Hkv, B, 2 D]
    far: tuple,  # from the store for blocks far_blocks [Hkv, n] (row.far_blocks, then the selected):
    # keys at position 0 and values, each [Hkv, n * B, D]
    far_blocks: torch.Tensor,
    cfg: LminfConfig,
    scale: float,
    rotary: RotarySpec,
) -> torch.Tensor:
    """Top-k attention of one decode row, the contract's (attend_chunk's) in one softmax:
    window keys at their distance, every other key at min(i - j, C). -> [H, Dv] float32

    Scores are float32. The weights meet the values in the cache dtype, as FlashAttention
    does (P is rounded to it before the P V product): with a bfloat16 cache that spares
    converting every value, and float32 caches are float32 throughout."""
    H, D = q.shape
    Hkv, B, W = kv_cache.shape[1], kv_cache.shape[2], cfg.local_tokens
    pool = kv_cache.view(-1, B, kv_cache.shape[-1]).index_select(0, row.window_rows)  # [Hkv * nw, B, 2D]
    window = pool.view(Hkv, -1, pool.shape[-1])[:, row.start : row.start + W]
    k_w, v_w = window[..., :D].float(), window[..., D:]
    qv = q.view(Hkv, -1, D)
    s_far = far_scores(q, q_cap, row, far, far_blocks, cfg, B, rotary)
    p = torch.softmax(torch.cat((torch.bmm(qv, k_w.transpose(1, 2)), s_far), dim=-1) * scale, dim=-1)
    p = p.to(v_w.dtype)
    return (torch.bmm(p[..., :W], v_w).float() + torch.bmm(p[..., W:], far[1]).float()).view(H, -1)


def far_scores(q, q_cap, row: DecodeRow, far: tuple, far_blocks: torch.Tensor, cfg: LminfConfig, B: int,
               rotary: RotarySpec):  # fmt: skip
    """A decode row's scores (unscaled, float32) of the keys it reads from the store, attend_decode's
    `far`: [Hkv, g, n * B], -inf on the rows of block fa inside its window."""
    Hkv, D = far[0].shape[0], q.shape[-1]
    at_zero = far[0].float()
    s_far = torch.bmm(q_cap.view(Hkv, -1, D), at_zero.transpose(1, 2))  # [Hkv, g, n_far]
    if cfg.distance_cap > cfg.local_tokens:  # keys within the cap are read as stored
        pos = (far_blocks[..., None] * B + torch.arange(B, device=q.device)).flatten(1)
        keys = rotated_to(at_zero, pos, rotary)
        near = (row.i - pos <= cfg.distance_cap)[:, None]
        s_far = torch.where(near, torch.bmm(q.view(Hkv, -1, D), keys.transpose(1, 2)), s_far)
    g = row.far_blocks.shape[1] - 1
    s_far[..., g * B + row.start : (g + 1) * B] = float("-inf")  # block fa's rows in the window
    return s_far


def far_part(scores: torch.Tensor, values: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode rows' attention over their store keys alone: far_scores [R, Hkv, g, n] and the
    values [R, Hkv, n, Dv] -> outputs [R, H, Dv] float32 and log-sum-exps [R, H]."""
    R, Hkv, g, _ = scores.shape
    s = scores * scale
    lse = torch.logsumexp(s, dim=-1, keepdim=True)  # finite: such a row always has selected blocks
    out = torch.matmul(torch.exp(s - lse), values.float())
    return out.view(R, Hkv * g, -1), lse.view(R, Hkv * g)


def merge_two(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """One softmax from two parts that were normalised apart, outputs [..., Dv] and log-sum-exps
    [...] each: a's weight in the joint softmax is sigmoid(lse_a - lse_b)."""
    return torch.lerp(out_b, out_a, torch.sigmoid(lse_a - lse_b)[..., None])
