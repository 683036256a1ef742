"""A decode row's attention where C = W, in one C++ pass per layer over the pool and the host store.

Where C = W, every key a top-k decode row at i reads outside its window (the global blocks,
the rows of its first window block fa before the window, the k picks) is seen at distance C,
so its score is scale * q_C . u_j with u_j the key at position 0, which is what the host store
holds (docs/topk-contract.md, "Scoring a middle block"); its window's keys are read as the pool
holds them, with the query as the model rotated it. `attend` computes, for every decode row of a
step at once, the softmax output and log-sum-exp per query head over both, reading the keys and
values in place (no gather, no rotation, no copy into the pool) in one pass: the softmax kept
online, each value weighed for all query heads of its KV head at once, the pool's keys in pieces
of 16 so that each piece's values (beside its keys in the pool) are read while they are in L1,
a row's KV heads of a block one after another (the pool keeps them together: read in that order,
the pass runs 1.35x faster at 8 rows than with an item per row and KV head).
(It replaced a call of vLLM's decode op over the windows joined with this pass over the store's
keys alone, which it outruns 1.55x for 8 rows of SmolLM2's shape and 1.8x for one: the pass alone
had one work item per row and KV head, so one row's 3 left a thread idle; benchmarks/
topk_decode_pass.py, docs/topk-contract.md.)
Built and checked as mass_kernel.py builds its pass (the same loader, the same float64-reference
check on awkward shapes); where it cannot be built or disagrees it warns, and paths/topk takes the
op for the windows and PyTorch for the other keys instead (row by row, as where C > W), as it does
with LMINF_TOPK_FAR_KERNEL=0.
"""

import functools
import os

import torch

from lminf_vllm.paths.topk.mass_kernel import LOADS, TYPES, checked_build, load_pybinding

ENV_SWITCH = "LMINF_TOPK_FAR_KERNEL"

_SOURCE = (
    LOADS
    + r"""
// acc[i * Dv + d] += sum over n keys b of w[i * T + b] * value_b[d] (values vs elements apart), for the NG query
// heads at once: each value is read and converted once, NV = Dv / Vec2::size() vectors a head kept in registers.
template <int NG, int NV>
static inline void weigh_tile(const KT* v, int64_t vs, int64_t n, const float* w, int64_t T, float* acc, int64_t Dv) {
    constexpr int64_t W2 = Vec2::size();
    Vec2 a[NG][NV];
    for (int i = 0; i < NG; ++i)
        for (int c = 0; c < NV; ++c) a[i][c] = Vec2::loadu(acc + i * Dv + c * W2);
    for (int64_t b = 0; b < n; ++b) {
        for (int c = 0; c < NV; ++c) {
            const Vec2 x = load_keys(v + b * vs + c * W2);
            for (int i = 0; i < NG; ++i) a[i][c] = at::vec::fmadd(x, Vec2(w[i * T + b]), a[i][c]);
        }
    }
    for (int i = 0; i < NG; ++i)
        for (int c = 0; c < NV; ++c) a[i][c].store(acc + i * Dv + c * W2);
}

// weigh_tile for any G and Dv (the shapes it is not compiled for: a head at a time, the channels one by one)
static void weigh_any(const KT* v, int64_t vs, int64_t n, const float* w, int64_t T, float* acc, int64_t G, int64_t Dv) {
    if (Dv == 2 * Vec2::size()) {
        switch (G) {
            case 1: return weigh_tile<1, 2>(v, vs, n, w, T, acc, Dv);
            case 2: return weigh_tile<2, 2>(v, vs, n, w, T, acc, Dv);
            case 3: return weigh_tile<3, 2>(v, vs, n, w, T, acc, Dv);
            case 4: return weigh_tile<4, 2>(v, vs, n, w, T, acc, Dv);
        }
    } else if (Dv == 4 * Vec2::size()) {
        switch (G) {
            case 1: return weigh_tile<1, 4>(v, vs, n, w, T, acc, Dv);
            case 2: return weigh_tile<2, 4>(v, vs, n, w, T, acc, Dv);
        }
    }
    for (int64_t i = 0; i < G; ++i)
        for (int64_t b = 0; b < n; ++b)
            for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] += w[i * T + b] * static_cast<float>(v[b * vs + d]);
}

// Pair p = (row r, KV head h) attends, for query head i of h's group, in one softmax:
// - its window (NW > 0): the segments win[(r * NW + u) * 3 ...] = (physical block, first slot, count) of the KV
//   cache at `cache` ([blocks, Hkv, B, 2 D] of KT: each slot's key, then its value; D == Dv), with qw[p, i],
//   the query as the model rotated it (the window's keys are stored at their own positions);
// - its listed store blocks j < NB: block blocks[p * NB + j] of row r's store (chunk c = block / N at
//   key_base[r * MC + c], its head h at ((block % N) * Hkv + h) * B * D elements; values likewise from val_base
//   with Dv), its first counts[r * NB + j] keys, with q[p, i] (the query rotated to C: those keys are at 0).
// out[p, i, :] = softmax(scale * scores) values, lse[p, i] its log-sum-exp. The softmax is kept online (a
// running max per query head; the sum and the weighed values rescaled when it grows): each key and value is
// read once, while its block is in the cache. A row's NW slices and NB blocks go to S work items (so that a
// step of few rows still gives every thread work), each taking its slices and blocks in order and, in each, the
// row's KV heads in turn: a pool block's heads are one run of memory ([Hkv, B, 2 D]), read front to back that
// way (an item per pair, reading one head's 32 KB and skipping the others', was 1.35x slower at 8 rows of
// SmolLM2's shape). Each item leaves (max, sum, weighed values) per pair in part; then per pair the items are
// joined.
extern "C" void kernel(const int64_t* key_base, const int64_t* val_base, const int64_t* blocks,
                       const int64_t* counts, const float* q, const int64_t* win, const float* qw, float* out,
                       float* lse, float* part, const int64_t cache, const int64_t R, const int64_t Hkv,
                       const int64_t G, const int64_t NB, const int64_t MC, const int64_t N, const int64_t NW,
                       const int64_t S, const int64_t B, const int64_t D, const int64_t Dv, const float scale) {
    const int64_t U = NW + NB, PS = G * (Dv + 2);  // a row's slices and blocks; per pair an item leaves m[G], l[G], acc[G, Dv]
    #pragma omp parallel
    {
        std::vector<float> s(G * B);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < R * S; ++w) {
            const int64_t r = w / S, part_of = w % S;
            for (int64_t h = 0; h < Hkv; ++h) {
                float* m = part + ((r * Hkv + h) * S + part_of) * PS;
                std::fill(m, m + G, -std::numeric_limits<float>::infinity());
                std::fill(m + G, m + 2 * G + G * Dv, 0.f);
            }
            // unit u's KV heads one after another: a window block's heads sit together in the pool
            for (int64_t x = part_of * U / S * Hkv; x < (part_of + 1) * U / S * Hkv; ++x) {
                const int64_t u = x / Hkv, h = x % Hkv, p = r * Hkv + h;
                float* m = part + (p * S + part_of) * PS;
                float* l = m + G;
                float* acc = l + G;
                const KT *keys, *vals;
                const float* qp;
                int64_t n, ks, vs, piece;
                if (u < NW) {
                    const int64_t* seg = win + (r * NW + u) * 3;
                    n = seg[2];
                    keys = reinterpret_cast<const KT*>(cache) + ((seg[0] * Hkv + h) * B + seg[1]) * 2 * D;
                    vals = keys + D;
                    ks = vs = 2 * D;
                    piece = 16;  // (each key beside its value: a piece's keys and values stay in L1 between the two)
                    qp = qw + p * G * D;
                } else {
                    const int64_t j = u - NW, blk = blocks[p * NB + j], c = blk / N, at = (blk % N) * Hkv + h;
                    n = counts[r * NB + j];
                    keys = reinterpret_cast<const KT*>(key_base[r * MC + c]) + at * B * D;
                    vals = reinterpret_cast<const KT*>(val_base[r * MC + c]) + at * B * Dv;
                    ks = D;
                    vs = Dv;
                    piece = B;
                    qp = q + p * G * D;
                }
                for (int64_t a = 0; a < n; a += piece) {
                    const int64_t t = std::min(piece, n - a);
                    dot_keys(keys + a * ks, ks, qp, G, t, D, scale, s.data(), B);
                    for (int64_t i = 0; i < G; ++i) {
                        float* si = s.data() + i * B;  // scores -> exp(score - running max)
                        const float mt = std::max(m[i], max_of(si, t));
                        const float shrink = std::exp(m[i] - mt);  // (0 on the first piece: m is -inf)
                        if (shrink != 1.f) {
                            l[i] *= shrink;
                            for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] *= shrink;
                        }
                        l[i] += exp_sum(si, t, mt, true);
                        m[i] = mt;
                    }
                    weigh_any(vals + a * vs, vs, t, s.data(), B, acc, G, Dv);
                }
            }
        }
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < R * Hkv; ++p) {
            for (int64_t i = 0; i < G; ++i) {
                float top = -std::numeric_limits<float>::infinity();
                for (int64_t t = 0; t < S; ++t) top = std::max(top, part[(p * S + t) * PS + i]);
                float* o = out + (p * G + i) * Dv;
                std::fill(o, o + Dv, 0.f);
                if (top == -std::numeric_limits<float>::infinity()) {  // (a pair that reads nothing)
                    lse[p * G + i] = top;
                    continue;
                }
                float sum = 0.f;
                for (int64_t t = 0; t < S; ++t) {
                    const float* it = part + (p * S + t) * PS;
                    const float f = std::exp(it[i] - top);  // (0 for an item that read nothing)
                    sum += f * it[G + i];
                    for (int64_t d = 0; d < Dv; ++d) o[d] += f * it[2 * G + i * Dv + d];
                }
                for (int64_t d = 0; d < Dv; ++d) o[d] /= sum;
                lse[p * G + i] = top + std::log(sum);
            }
        }
    }
}
"""
)

_ARGTYPES = (["const int64_t*"] * 4 + ["const float*", "const int64_t*", "const float*", "float*", "float*", "float*"]
             + ["const int64_t"] * 12 + ["const float"])  # fmt: skip


def usable(dtype: torch.dtype) -> bool:
    """Does `attend` serve stores of this dtype here (built, checked, not switched off)?"""
    return os.environ.get(ENV_SWITCH, "1") != "0" and kernel_ok(dtype)


def attend(bases: tuple[torch.Tensor, torch.Tensor], blocks: torch.Tensor, counts: torch.Tensor, q: torch.Tensor,
           per_chunk: int, block_size: int, value_size: int, dtype: torch.dtype, scale: float,
           window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
           splits: int = 1) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Rows' attention over keys at position 0 in host-store chunks: bases int64 [R, MC] row r's keys'
    chunk addresses, its values' (base_table), chunks [per_chunk, Hkv, B, D] and
    [per_chunk, Hkv, B, Dv] of `dtype`;
    blocks [R, Hkv, NB] long (row r's KV head h reads these blocks of its chunks), counts [R, NB]
    (of block j, its first counts[r, j] keys; 0: none); q [R, Hkv, g, D] float32.
    window: the rows' windows in the same softmax: (kv_cache [blocks, Hkv, B, 2 D] of `dtype`, contiguous;
    segments [R, NW, 3] long, row r's (physical block, first slot, count), count 0: none; qw [R, Hkv, g, D]
    float32, the query as the model rotated it). splits: work items a row is cut into.
    -> outputs [R, Hkv * g, Dv] float32, log-sum-exps [R, Hkv * g] (-inf where a row reads nothing)."""
    R, Hkv, g, D = q.shape
    key_base, val_base = bases
    MC = key_base.shape[1]
    out = torch.empty(R, Hkv * g, value_size)
    lse = torch.empty(R, Hkv * g)
    part = torch.empty(R * Hkv * splits, g * (value_size + 2))
    if window is None:
        cache, segments, qw = 0, torch.zeros(R, 0, 3, dtype=torch.long), q
    else:
        kv_cache, segments, qw = window
        if not kv_cache.is_contiguous() or kv_cache.dtype != dtype or kv_cache.shape[-1] != 2 * D or value_size != D:
            raise ValueError("attend's window: a contiguous cache [blocks, Hkv, B, 2 D] of the store's dtype, Dv = D")
        cache, segments = kv_cache.data_ptr(), segments.long().contiguous()
    _kernel(dtype)(key_base, val_base, blocks.long().contiguous(), counts.long().contiguous(), q.float().contiguous(),
                   segments, qw.float().contiguous(), out, lse, part, cache, R, Hkv, g, blocks.shape[-1], MC, per_chunk,
                   segments.shape[1], splits, block_size, D, value_size, scale)  # fmt: skip
    return out, lse


def splits_for(items: int, threads: int) -> int:
    """Work items to cut each of a step's `items` into so that every thread has work (up to 4): `attend`'s
    rows, or the (row, KV head) pairs that ops.ListedCall splits vLLM's decode op by."""
    return max(1, min(4, -(-2 * threads // max(1, items))))


def base_table(bases: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """attend's bases from per row (its keys' chunk addresses, its values')."""
    MC = max(len(k) for k, _ in bases)
    return tuple(torch.tensor([b[i] + [0] * (MC - len(b[i])) for b in bases], dtype=torch.int64) for i in (0, 1))


def reference(keys: list[torch.Tensor], values: list[torch.Tensor], blocks: torch.Tensor, counts: torch.Tensor,
              q: torch.Tensor, scale: float, window: tuple | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`attend` in float64 for one row: its chunks keys [c] [N, Hkv, B, D] and values, blocks [Hkv, NB],
    counts [NB], q [Hkv, g, D]; window (kv_cache, segments [NW, 3], qw [Hkv, g, D]) or None
    -> [Hkv * g, Dv], [Hkv * g]."""
    Hkv, g, D = q.shape
    N = keys[0].shape[0]
    outs, lses = [], []
    for h in range(Hkv):
        pick = lambda chunks, j: chunks[int(blocks[h, j]) // N][int(blocks[h, j]) % N, h, : int(counts[j])]  # noqa: E731
        k = torch.cat([pick(keys, j) for j in range(blocks.shape[1])]).double()
        v = torch.cat([pick(values, j) for j in range(blocks.shape[1])]).double()
        s = q[h].double() @ k.T * scale  # [g, n]
        if window is not None:
            cache, segments, qw = window
            own = torch.cat([cache[int(b), h, int(f) : int(f) + int(n)] for b, f, n in segments.tolist()]).double()
            s = torch.cat((qw[h].double() @ own[:, :D].T * scale, s), dim=-1)
            v = torch.cat((own[:, D:], v))
        outs.append(torch.softmax(s, -1) @ v)
        lses.append(torch.logsumexp(s, -1))
    return torch.cat(outs), torch.cat(lses)


@functools.cache
def _kernel(dtype: torch.dtype):
    return load_pybinding(_ARGTYPES, _SOURCE.replace("KEY_TYPE", TYPES[dtype]))


@functools.cache
def kernel_ok(dtype: torch.dtype) -> bool:
    """Build the pass for stores of this dtype and hold it to the float64 reference: two rows of
    different chunk counts, a block read in part and one not at all, sizes that are no multiple of
    the vector width; with windows from a cache (segments in part, empty, of one slot) and without,
    a row's work in one item and in three."""
    if dtype not in TYPES:
        return False

    def check() -> bool:
        gen = torch.Generator().manual_seed(0)
        for Hkv, g, B, D, Dv in ((3, 3, 16, 64, 64), (1, 4, 5, 40, 24), (2, 1, 32, 80, 80)):
            N = 3
            stores = [[torch.randn(N, Hkv, B, d, generator=gen).to(dtype) for _ in range(c)] for c in (2, 3)
                      for d in (D, Dv)]  # fmt: skip
            rows = [(stores[0], stores[1]), (stores[2], stores[3])]
            blocks = torch.stack([torch.randint(0, 3 * c, (Hkv, 4), generator=gen) for c in (2, 3)])
            counts = torch.tensor([[B, 3, 0, B], [1, B, B, B]])
            q = torch.randn(2, Hkv, g, D, generator=gen)
            bases = [([t.data_ptr() for t in k], [t.data_ptr() for t in v]) for k, v in rows]
            cache = torch.randn(7, Hkv, B, 2 * D, generator=gen).to(dtype)
            segments = torch.tensor([[[5, B - 2, 2], [0, 0, B], [3, 0, 1]], [[6, 1, B - 1], [2, 0, 0], [0, 0, 0]]])
            qw = torch.randn(2, Hkv, g, D, generator=gen)
            for window, splits in ((None, 1), ((cache, segments, qw), 1), ((cache, segments, qw), 3)):
                if window is not None and Dv != D:
                    continue
                out, lse = attend(base_table(bases), blocks, counts, q, N, B, Dv, dtype, 0.3, window, splits)
                for r, (k, v) in enumerate(rows):
                    own = None if window is None else (cache, segments[r], qw[r])
                    want_out, want_lse = reference(k, v, blocks[r], counts[r], q[r], 0.3, own)
                    if not (torch.allclose(out[r].double(), want_out, atol=1e-4, rtol=1e-4)
                            and torch.allclose(lse[r].double(), want_lse, atol=1e-4, rtol=1e-5)):  # fmt: skip
                        return False
        return True

    return checked_build("far keys' C++ pass", "PyTorch", check)
