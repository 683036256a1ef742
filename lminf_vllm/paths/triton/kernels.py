"""The Λ-attention of SPEC.md as Triton kernels over the paged KV cache.

Same contract and cache layout (kv_layout.OWN_LAYOUT) as the PyTorch path:
    kv_cache: [num_blocks, num_kv_heads, block_size, 2 * head_size], key | value
but a whole batch (prefill chunks and decodes mixed) in one call of two or
three launches:
1. `_global_branch_kernel` (when G > 0): pairs with j < G and i - j >= W, into
   per-(token, head) partials (running max, sum, unnormalised accumulator);
2. `_window_kernel`: pairs with 0 <= i - j < W, keys max(0, i_min - W + 1) ..
   i_max, merged with the global partials by log-sum-exp before the store
   (as vLLM's merge_attn_states does), or, under split-K, written as partials;
3. `_merge_segments_kernel` (split-K only): merges the segments and the global
   partials.
The global branch has its own launch because its per-key re-rotation needs
many registers: compiled into the window kernel, it made that kernel spill
kilobytes per thread and cut its occupancy. With float64 cos/sin (now float32
after a float64 reduction) that first version was 12x slower in decode and 4x
in prefill on an H200 (benchmarks/results/gpu-h200/).

Grid: (q_blocks, num_kv_heads[, NUM_SEGMENTS]). A program owns BLOCK_Q query
tokens of one request times the GROUP query heads that share one KV head (GQA
packed into the BLOCK_M = BLOCK_Q * GROUP rows of the tile), so every key tile
is read once for the whole group. q_blocks = T // BLOCK_Q + R is an upper bound
known from the tensor shapes alone; each program finds its request by a binary
search over query_start_loc and returns early if it has no queries. No host
sync, no data-dependent launch: the call is CUDA-graph capturable (checked on a
GPU by benchmarks/gpu_check.py).

Every key a program loads is visible to some query of its tile, so it never
reads a block the request may have freed (freed ids stay in the block table and
get reused); loads outside those ranges are masked, never issued, and masked
loads read 0, so NaN in unwritten or foreign slots cannot reach a product.

Split-K for decode: with few (request, KV head) programs and a long window most
SMs would idle, so a third grid axis cuts the window tiles into NUM_SEGMENTS
shares. The count depends on shapes, config and the SM count only
(`_auto_segments`), never on sequence lengths.

Global re-rotation. For a global pair beyond the cap (i - j > C) the score is
<R(C - (i - j)) q_i, k_j>, q_i and k_j stored rotated at i and j. Since
rotations compose, that equals <R(C - i) q_i, R(-j) k_j>: one rotation per
query row and one per key, so the capped scores are a plain matrix product
(no per-pair rotation). Pairs with W <= i - j <= C use the plain product. The
angles (C - i) * inv_freq and -j * inv_freq are formed and reduced to
[-pi, pi] in float64 (|C - i| reaches 1e5 and more, where float32 angles are
off by ~1e-2 rad), then cos/sin run in float32. The rotations are pure, so a
cos/sin factor already carried by the stored q and k (YaRN's mscale) is not
applied twice. Neox and interleaved pair layouts and partial rotary
(rotary_dim < head_size) are supported.
"""

import functools
import json
import os

import torch

from lminf_vllm.config import LminfConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path never needs it
    triton = None


def triton_available() -> bool:
    """Can the Triton path run at all (the package imports)?"""
    return triton is not None


if triton is not None:

    @triton.jit
    def _find_request(qsl_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
        # Request r's query blocks start at qsl[r] // BLOCK_Q + r (increasing in r):
        # the last request whose start is <= q_block owns it.
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= q_block:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _rope_lanes(d, ROT_DIM: tl.constexpr, IS_NEOX: tl.constexpr):
        """For each feature lane d: its frequency index, its pair partner, the sign
        of the partner's term, and whether the lane is rotated at all."""
        HALF: tl.constexpr = ROT_DIM // 2
        if IS_NEOX:  # pairs (d, d + rot/2)
            first = d < HALF
            freq = tl.where(first, d, d - HALF)
            partner = tl.where(first, d + HALF, d - HALF)
        else:  # pairs (2f, 2f + 1)
            first = d % 2 == 0
            freq = d // 2
            partner = d ^ 1
        rotated = d < ROT_DIM
        sign = tl.where(first, -1.0, 1.0)
        return tl.where(rotated, freq, 0), tl.where(rotated, partner, d), sign, rotated

    @triton.jit
    def _rotate(x, x_partner, angle, sign, rotated):
        """x rotated by `angle` (float64, broadcast to x's shape) on the rotated lanes.
        The angle is reduced to [-pi, pi] in float64 with plain arithmetic, then
        cos/sin run in float32: float64 cos/sin would inline libdevice's long
        float64 routines per element (thousands of instructions, register spills)."""
        TWO_PI: tl.constexpr = 6.283185307179586
        turns = tl.floor(angle * (1.0 / TWO_PI) + 0.5)
        reduced = (angle - turns * TWO_PI).to(tl.float32)
        return tl.where(rotated, x * tl.cos(reduced) + sign * x_partner * tl.sin(reduced), x)

    @triton.jit
    def _online_softmax_step(m_i, l_i, acc, s, v, PRECISION: tl.constexpr):
        """Fold one tile of log2-scaled scores s [M, N] (-inf = masked) and values v [N, D] in."""
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: no NaN
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _program_rows(qsl_ptr, seq_lens_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                      GROUP: tl.constexpr):  # fmt: skip
        """The rows (BLOCK_Q tokens x GROUP heads of one KV head) this program owns.
        Returns active (has it any query), the request, its first query's index in
        the batch, the query index within the request and query head of each row,
        which rows are real, their positions, and the tile's lowest and highest position."""
        req = _find_request(qsl_ptr, num_seqs, q_block, BLOCK_Q)
        q_start = tl.load(qsl_ptr + req)
        q_len = tl.load(qsl_ptr + req + 1) - q_start
        local_block = q_block - (q_start // BLOCK_Q + req)
        active = local_block * BLOCK_Q < q_len
        seq_len = tl.load(seq_lens_ptr + req)
        first_pos = seq_len - q_len  # position of the request's first query this step
        rows = tl.arange(0, BLOCK_M)
        tok = local_block * BLOCK_Q + rows // GROUP  # query index within the request
        head = tl.program_id(1) * GROUP + rows % GROUP
        row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
        i_min = first_pos + local_block * BLOCK_Q
        i_max = tl.minimum(i_min + BLOCK_Q, seq_len) - 1
        return active, req, q_start, tok, head, row_ok, first_pos + tok, i_min, i_max

    @triton.jit
    def _query_tile(q_start, tok, head, row_ok, stride_qt, stride_qh, BLOCK_D: tl.constexpr,
                    HEAD_SIZE: tl.constexpr):  # fmt: skip
        """Feature lanes, which are real, and the query offsets and mask of the tile's rows."""
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_SIZE
        q_rows = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
        return d, d_ok, q_rows, row_ok[:, None] & d_ok[None, :]

    @triton.jit
    def _empty_softmax_state(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Running max (-inf), sum and accumulator of an online softmax with no key yet."""
        return (tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32),
                tl.zeros([BLOCK_M, BLOCK_D], tl.float32))  # fmt: skip

    @triton.jit
    def _global_branch_kernel(
        q_ptr,  # [T, H, D], rotated at true positions
        kv_ptr,  # [num_blocks, Hkv, B, 2 * D]
        g_acc_ptr,  # [T, H, BLOCK_D] float32: unnormalised sum of p * v over the global keys
        g_max_ptr,  # [T, H] float32: running max (log2 domain), -inf where no global key is seen
        g_sum_ptr,  # [T, H] float32: sum of p
        qsl_ptr,
        seq_lens_ptr,
        block_table_ptr,
        inv_freq_ptr,  # [ROT_DIM // 2] float64
        num_seqs,
        H,
        stride_qt,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kr,
        stride_bt,
        scale_log2,
        G,
        W,
        C,
        HEAD_SIZE: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ROT_DIM: tl.constexpr,
        IS_NEOX: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_G: tl.constexpr,  # keys per global tile
        PAGE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """The global branch alone: pairs (i, j) with j < G and i - j >= W. Its own
        launch because the per-key re-rotation needs many registers; compiled into
        the window kernel it cost that kernel its occupancy and spilled."""
        kv_head = tl.program_id(1)
        active, req, q_start, tok, head, row_ok, pos, i_min, i_max = _program_rows(
            qsl_ptr, seq_lens_ptr, num_seqs, tl.program_id(0), BLOCK_Q, BLOCK_M, GROUP
        )
        if not active:
            return
        d, d_ok, q_rows, q_mask = _query_tile(q_start, tok, head, row_ok, stride_qt, stride_qh, BLOCK_D, HEAD_SIZE)
        m_i, l_i, acc = _empty_softmax_state(BLOCK_M, BLOCK_D)
        n_glob = tl.maximum(tl.minimum(G, i_max - W + 1), 0)  # globals some query sees outside its window
        if n_glob > 0:
            q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
            kv_base = kv_ptr + kv_head * stride_kh
            table_row = block_table_ptr + req.to(tl.int64) * stride_bt
            freq, partner, sign, rotated = _rope_lanes(d, ROT_DIM, IS_NEOX)
            inv_freq = tl.load(inv_freq_ptr + freq, mask=rotated, other=0.0)  # float64
            q_partner = tl.load(q_ptr + q_rows[:, None] + partner[None, :], mask=q_mask, other=0.0)
            q_angle = (C - pos).to(tl.float64)[:, None] * inv_freq[None, :]
            q_cap = _rotate(q.to(tl.float32), q_partner.to(tl.float32), q_angle, sign[None, :], rotated[None, :])
            q_cap = q_cap.to(q.dtype)
            for t in range(0, tl.cdiv(n_glob, BLOCK_G)):
                j = t * BLOCK_G + tl.arange(0, BLOCK_G)
                j_ok = j < n_glob
                block = tl.load(table_row + j // PAGE, mask=j_ok, other=0)
                slot = block.to(tl.int64) * stride_kb + (j % PAGE) * stride_kr
                kv_mask = d_ok[:, None] & j_ok[None, :]
                k_t = tl.load(kv_base + slot[None, :] + d[:, None], mask=kv_mask, other=0.0)  # [D, N]
                k_p = tl.load(kv_base + slot[None, :] + partner[:, None], mask=kv_mask, other=0.0)
                k_angle = -(j.to(tl.float64)[None, :] * inv_freq[:, None])
                k_cap = _rotate(k_t.to(tl.float32), k_p.to(tl.float32), k_angle, sign[:, None], rotated[:, None])
                s_plain = tl.dot(q, k_t, input_precision=PRECISION)
                s_cap = tl.dot(q_cap, k_cap.to(k_t.dtype), input_precision=PRECISION)
                dist = pos[:, None] - j[None, :]
                s = tl.where(dist > C, s_cap, s_plain) * scale_log2
                s = tl.where(row_ok[:, None] & j_ok[None, :] & (dist >= W), s, float("-inf"))
                v_mask = j_ok[:, None] & d_ok[None, :]
                v = tl.load(kv_base + slot[:, None] + (HEAD_SIZE + d)[None, :], mask=v_mask, other=0.0)
                m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, PRECISION)
        part = (q_start + tok).to(tl.int64) * H + head
        tl.store(g_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(g_max_ptr + part, m_i, mask=row_ok)
        tl.store(g_sum_ptr + part, l_i, mask=row_ok)

    @triton.jit
    def _window_kernel(
        q_ptr,  # [T, H, D], rotated at true positions
        kv_ptr,  # [num_blocks, Hkv, B, 2 * D]
        out_ptr,  # [T, H, D]
        part_acc_ptr,  # NUM_SEGMENTS > 1: partial results, see _merge_segments_kernel
        part_max_ptr,
        part_sum_ptr,
        g_acc_ptr,  # HAS_GLOBAL and NUM_SEGMENTS == 1: the global branch's partials, merged here
        g_max_ptr,
        g_sum_ptr,
        qsl_ptr,  # [R + 1] int32 query_start_loc
        seq_lens_ptr,  # [R] int32: tokens computed after this step
        block_table_ptr,  # [R, max_blocks] int32
        num_seqs,
        H,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_kb,
        stride_kh,
        stride_kr,
        stride_bt,
        scale_log2,  # softmax scale * log2(e): scores go through exp2
        W,
        HEAD_SIZE: tl.constexpr,
        BLOCK_D: tl.constexpr,
        GROUP: tl.constexpr,  # query heads per KV head
        BLOCK_Q: tl.constexpr,  # query tokens per program
        BLOCK_M: tl.constexpr,  # rows per program: >= BLOCK_Q * GROUP, a power of 2
        BLOCK_N: tl.constexpr,  # keys per tile
        PAGE: tl.constexpr,  # KV cache block size
        PRECISION: tl.constexpr,  # "ieee" for float32 inputs: no TF32 in the products
        NUM_SEGMENTS: tl.constexpr,  # > 1: each program takes 1/NUM_SEGMENTS of the key tiles
        HAS_GLOBAL: tl.constexpr,  # G > 0: merge the global branch's partials
    ):
        """The window branch: pairs with 0 <= i - j < W, keys max(0, i_min - W + 1) .. i_max."""
        kv_head = tl.program_id(1)
        active, req, q_start, tok, head, row_ok, pos, i_min, i_max = _program_rows(
            qsl_ptr, seq_lens_ptr, num_seqs, tl.program_id(0), BLOCK_Q, BLOCK_M, GROUP
        )
        if not active:
            return
        d, d_ok, q_rows, q_mask = _query_tile(q_start, tok, head, row_ok, stride_qt, stride_qh, BLOCK_D, HEAD_SIZE)
        q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=q_mask, other=0.0)
        kv_base = kv_ptr + kv_head * stride_kh
        table_row = block_table_ptr + req.to(tl.int64) * stride_bt
        m_i, l_i, acc = _empty_softmax_state(BLOCK_M, BLOCK_D)

        # Split-K: segment program_id(2) of NUM_SEGMENTS takes a contiguous share of the tiles.
        lo = tl.maximum(i_min - W + 1, 0)  # oldest key of any window here
        n_tiles = tl.cdiv(i_max + 1 - lo, BLOCK_N)
        share = tl.cdiv(n_tiles, NUM_SEGMENTS)
        t_lo = tl.program_id(2) * share
        t_hi = tl.minimum(t_lo + share, n_tiles)
        for t in range(t_lo, t_hi):
            j = lo + t * BLOCK_N + tl.arange(0, BLOCK_N)
            j_ok = j <= i_max
            block = tl.load(table_row + j // PAGE, mask=j_ok, other=0)
            slot = block.to(tl.int64) * stride_kb + (j % PAGE) * stride_kr
            k_t = tl.load(kv_base + slot[None, :] + d[:, None], mask=d_ok[:, None] & j_ok[None, :], other=0.0)
            dist = pos[:, None] - j[None, :]
            s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2
            s = tl.where(row_ok[:, None] & j_ok[None, :] & (dist >= 0) & (dist < W), s, float("-inf"))
            v_mask = j_ok[:, None] & d_ok[None, :]
            v = tl.load(kv_base + slot[:, None] + (HEAD_SIZE + d)[None, :], mask=v_mask, other=0.0)
            m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, PRECISION)

        part_row = (q_start + tok).to(tl.int64) * H + head
        if NUM_SEGMENTS == 1:
            if HAS_GLOBAL:  # log-sum-exp merge with the global branch, as merge_attn_states
                m_g = tl.load(g_max_ptr + part_row, mask=row_ok, other=float("-inf"))
                l_g = tl.load(g_sum_ptr + part_row, mask=row_ok, other=0.0)
                acc_g = tl.load(g_acc_ptr + part_row[:, None] * BLOCK_D + d[None, :], mask=row_ok[:, None], other=0.0)
                m_all = tl.maximum(m_i, m_g)  # finite: every query sees itself
                w_win = tl.exp2(m_i - m_all)
                w_glob = tl.exp2(m_g - m_all)
                acc = acc * w_win[:, None] + acc_g * w_glob[:, None]
                l_i = l_i * w_win + l_g * w_glob
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            o_rows = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
            tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
        else:  # partial results [T, H, NUM_SEGMENTS] for _merge_segments_kernel
            part = part_row * NUM_SEGMENTS + tl.program_id(2)
            tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
            tl.store(part_max_ptr + part, m_i, mask=row_ok)
            tl.store(part_sum_ptr + part, l_i, mask=row_ok)

    @triton.jit
    def _merge_segments_kernel(
        part_acc_ptr,  # [T, H, S, BLOCK_D] float32, unnormalised
        part_max_ptr,  # [T, H, S] float32, log2 domain
        part_sum_ptr,  # [T, H, S] float32
        g_acc_ptr,  # HAS_GLOBAL: the global branch's partials, [T, H, BLOCK_D] and [T, H]
        g_max_ptr,
        g_sum_ptr,
        out_ptr,
        qsl_ptr,
        num_seqs,
        stride_ot,
        stride_oh,
        H,
        HEAD_SIZE: tl.constexpr,
        BLOCK_D: tl.constexpr,
        NUM_SEGMENTS: tl.constexpr,
        SEG_BLOCK: tl.constexpr,  # NUM_SEGMENTS rounded up to a power of 2
        HAS_GLOBAL: tl.constexpr,
    ):
        """Log-sum-exp merge of the segments (and the global branch) of one (token, head)."""
        token = tl.program_id(0)
        head = tl.program_id(1)
        if token >= tl.load(qsl_ptr + num_seqs):  # padding: no segment wrote it
            return
        seg = tl.arange(0, SEG_BLOCK)
        seg_ok = seg < NUM_SEGMENTS
        row = token.to(tl.int64) * H + head
        part = row * NUM_SEGMENTS + seg
        m = tl.load(part_max_ptr + part, mask=seg_ok, other=float("-inf"))
        l_s = tl.load(part_sum_ptr + part, mask=seg_ok, other=0.0)
        m_all = tl.max(m, axis=0)
        if HAS_GLOBAL:
            m_g = tl.load(g_max_ptr + row)
            m_all = tl.maximum(m_all, m_g)
        m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
        weight = tl.exp2(m - m_safe)  # empty segment: 0
        d = tl.arange(0, BLOCK_D)
        acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], mask=seg_ok[:, None], other=0.0)
        total = tl.sum(weight * l_s, axis=0)
        out = tl.sum(acc * weight[:, None], axis=0)
        if HAS_GLOBAL:
            w_g = tl.exp2(m_g - m_safe)
            total += w_g * tl.load(g_sum_ptr + row)
            out += w_g * tl.load(g_acc_ptr + row * BLOCK_D + d)
        out = out / tl.where(total > 0, total, 1.0)
        o_ptr = out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + d
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_SIZE)

# Launch overrides for tuning runs (benchmarks/gpu_tune.py): num_warps,
# num_stages, BLOCK_M, BLOCK_N of the window kernel, also settable as JSON in
# LMINF_TRITON_TUNING. Empty in serving.
def _tuning_from_env() -> dict[str, int]:
    text = os.environ.get("LMINF_TRITON_TUNING") or "{}"
    known = {"num_warps", "num_stages", "BLOCK_M", "BLOCK_N"}
    try:
        tuning = json.loads(text)
        assert isinstance(tuning, dict) and set(tuning) <= known and all(type(v) is int for v in tuning.values())
    except (ValueError, AssertionError):
        raise ValueError(f"LMINF_TRITON_TUNING must be a JSON object of integers with keys from {sorted(known)}, "
                         f"got {text!r}") from None  # fmt: skip
    return tuning


TUNING: dict[str, int] = _tuning_from_env()


def tile_sizes(group: int, head_size: int, dtype: torch.dtype, decode_only: bool) -> dict[str, int]:
    """BLOCK_M rows (BLOCK_Q tokens x GROUP heads), BLOCK_N keys, BLOCK_D lanes.
    16 rows suit a decode step, 64 a prefill chunk; float32 and heads over 128
    take halved tiles (checked by compiling for sm_80/sm_90: <= 100 KB shared)."""
    narrow = dtype.itemsize > 2
    block_d = max(16, triton.next_power_of_2(head_size))
    block_m = max(16 if decode_only else 32 if narrow else 64, triton.next_power_of_2(group))
    block_n = 32 if narrow or block_d > 128 else 64
    block_m, block_n = TUNING.get("BLOCK_M", block_m), TUNING.get("BLOCK_N", block_n)
    return dict(BLOCK_M=block_m, BLOCK_Q=block_m // group, BLOCK_N=block_n, BLOCK_G=16, BLOCK_D=block_d)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _auto_segments(device: torch.device, programs: int, cfg: LminfConfig, block_n: int) -> int:
    """Split-K for decode: with few (request, KV head) programs, a long window
    would keep most SMs idle. Aim at two programs per SM, at least 4 tiles each.
    Depends on shapes and config only, so a captured CUDA graph stays valid."""
    if device.type != "cuda":
        return 1
    want = -(-2 * _sm_count(device) // max(programs, 1))
    tiles = -(-cfg.local_tokens // block_n)  # window tiles; the global branch has its own launch
    return max(1, min(want, 16, tiles // 4))


def triton_lambda_attention(
    query: torch.Tensor,  # [T, H, D], rotated at true positions (T may include padding)
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, B, 2 * D], this step's keys already written
    output: torch.Tensor,  # [T, H, D], written for tokens [0, query_start_loc[-1])
    query_start_loc: torch.Tensor,  # [R + 1] int32, on the query's device
    seq_lens: torch.Tensor,  # [R] int32: tokens computed after this step
    block_table: torch.Tensor,  # [R, max_blocks] int32
    cfg: LminfConfig,
    scale: float,
    inv_freq: torch.Tensor,  # [rotary_dim // 2] float64, on the query's device
    rotary_dim: int,
    is_neox_style: bool,
    decode_only: bool = False,  # host hint: every request has one query (smaller tiles)
    num_segments: int | None = None,  # split-K over key tiles; None: chosen from the shapes
) -> torch.Tensor:
    """Λ-attention for a whole batch in one call (global branch, window, split-K merge); returns `output`."""
    if triton is None:
        raise RuntimeError("triton is not installed: use the PyTorch path (paths/pytorch.py)")
    T, H, D = query.shape
    _, Hkv, page, width = kv_cache.shape
    if width != 2 * D or H % Hkv or rotary_dim % 2 or not 0 < rotary_dim <= D:
        raise ValueError(
            f"bad shapes: query {tuple(query.shape)}, kv_cache {tuple(kv_cache.shape)}, rotary_dim {rotary_dim}"
        )
    if query.stride(-1) != 1 or kv_cache.stride(-1) != 1 or output.stride(-1) != 1:
        raise ValueError("the feature dimension of query, kv_cache and output must be contiguous")
    if inv_freq.dtype != torch.float64 or inv_freq.numel() != rotary_dim // 2:
        raise ValueError("inv_freq must be float64 with rotary_dim // 2 entries")
    group = H // Hkv
    tiles = tile_sizes(group, D, query.dtype, decode_only)
    block_q, block_n, block_d = tiles["BLOCK_Q"], tiles["BLOCK_N"], tiles["BLOCK_D"]
    num_seqs = seq_lens.shape[0]
    if num_segments is None:
        num_segments = _auto_segments(query.device, num_seqs * Hkv, cfg, block_n) if decode_only else 1
    dev, f32 = query.device, torch.float32
    if num_segments > 1:  # partial results, merged by a last launch
        part_acc = torch.empty(T, H, num_segments, block_d, dtype=f32, device=dev)
        part_max, part_sum = torch.empty(2, T, H, num_segments, dtype=f32, device=dev)
    else:
        part_acc = part_max = part_sum = output  # not touched
    has_global = cfg.global_tokens > 0
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    scale_log2 = scale * 1.4426950408889634  # log2(e): scores go through exp2
    common = dict(HEAD_SIZE=D, BLOCK_D=block_d, GROUP=group, BLOCK_Q=block_q, BLOCK_M=tiles["BLOCK_M"], PAGE=page,
                  PRECISION=precision)  # fmt: skip
    grid = (T // block_q + num_seqs, Hkv)
    if has_global:  # the global branch first, into [T, H] partials the window pass merges
        g_acc = torch.empty(T, H, block_d, dtype=f32, device=dev)
        g_max, g_sum = torch.empty(2, T, H, dtype=f32, device=dev)
        _global_branch_kernel[grid](
            query, kv_cache, g_acc, g_max, g_sum,
            query_start_loc, seq_lens, block_table, inv_freq,
            num_seqs, H,
            query.stride(0), query.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            block_table.stride(0),
            scale_log2, cfg.global_tokens, cfg.local_tokens, min(cfg.distance_cap, 2**31 - 1),  # C huge = no cap
            ROT_DIM=rotary_dim, IS_NEOX=is_neox_style, BLOCK_G=tiles["BLOCK_G"], **common,
        )  # fmt: skip
    else:
        g_acc = g_max = g_sum = output  # not touched
    launch = {k: v for k, v in TUNING.items() if k in ("num_warps", "num_stages")}
    _window_kernel[grid + (num_segments,)](
        query, kv_cache, output, part_acc, part_max, part_sum, g_acc, g_max, g_sum,
        query_start_loc, seq_lens, block_table,
        num_seqs, H,
        query.stride(0), query.stride(1),
        output.stride(0), output.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        block_table.stride(0),
        scale_log2, cfg.local_tokens,
        BLOCK_N=block_n, NUM_SEGMENTS=num_segments, HAS_GLOBAL=has_global, **common, **launch,
    )  # fmt: skip
    if num_segments > 1:
        _merge_segments_kernel[(T, H)](
            part_acc, part_max, part_sum, g_acc, g_max, g_sum, output, query_start_loc, num_seqs,
            output.stride(0), output.stride(1), H,
            HEAD_SIZE=D, BLOCK_D=block_d, NUM_SEGMENTS=num_segments,
            SEG_BLOCK=triton.next_power_of_2(num_segments), HAS_GLOBAL=has_global,
        )  # fmt: skip
    return output
