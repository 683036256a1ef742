"""A decode row's keys past its window, attended in one C++ pass per layer from the host store.

Where C = W, every key a top-k decode row at i reads outside its window (the global blocks,
the rows of its first window block fa before the window, the k picks) is seen at distance C,
so its score is scale * q_C . u_j with u_j the key at position 0, which is what the host store
holds (docs/topk-contract.md, "Scoring a middle block"). `attend` computes, for every decode row
of a step at once, that part's softmax output and log-sum-exp per query head, reading the keys
and values in place from the store's chunks (no gather, no rotation, no copy into the pool) in
one pass (the softmax kept online, each value weighed for all query heads of its KV head at once);
paths/topk joins it with the window's part (vLLM's decode op) by log-sum-exps. Built and checked
as mass_kernel.py builds its pass (the same loader, the same float64-reference check on awkward
shapes); where it cannot be built or disagrees it warns, and paths/topk scores those keys in
PyTorch instead (row by row, as where C > W), as it does with LMINF_TOPK_FAR_KERNEL=0.
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

// Pair p = (row r, KV head h) attends its listed blocks j < NB: block blocks[p * NB + j] of row r's store
// (chunk c = block / N at key_base[r * MC + c], its head h at ((block % N) * Hkv + h) * B * D elements; values
// likewise from val_base with Dv), its first counts[r * NB + j] keys. For query head i of h's group:
// out[p, i, :] = softmax(scale * q[p, i] . keys) values, lse[p, i] its log-sum-exp. One pass over the blocks,
// the softmax kept online (a running max per query head; the sum and the weighed values rescaled when it
// grows): each key and value is read once, while its block is in the cache.
extern "C" void kernel(const int64_t* key_base, const int64_t* val_base, const int64_t* blocks,
                       const int64_t* counts, const float* q, float* out, float* lse, const int64_t R,
                       const int64_t Hkv, const int64_t G, const int64_t NB, const int64_t MC, const int64_t N,
                       const int64_t B, const int64_t D, const int64_t Dv, const float scale) {
    #pragma omp parallel
    {
        std::vector<float> s(G * B), acc(G * Dv), m(G), l(G);
        #pragma omp for schedule(dynamic, 1)
        for (int64_t p = 0; p < R * Hkv; ++p) {
            const int64_t r = p / Hkv, h = p % Hkv;
            const int64_t* cnt = counts + r * NB;
            const int64_t* blk = blocks + p * NB;
            std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
            std::fill(l.begin(), l.end(), 0.f);
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t j = 0; j < NB; ++j) {
                const int64_t n = cnt[j];
                if (n == 0) continue;
                const int64_t c = blk[j] / N, at = (blk[j] % N) * Hkv + h;
                const KT* keys = reinterpret_cast<const KT*>(key_base[r * MC + c]) + at * B * D;
                const KT* vals = reinterpret_cast<const KT*>(val_base[r * MC + c]) + at * B * Dv;
                dot_keys(keys, q + p * G * D, G, n, D, scale, s.data(), B);
                for (int64_t i = 0; i < G; ++i) {
                    float* si = s.data() + i * B;  // scores -> exp(score - running max)
                    const float mt = std::max(m[i], max_of(si, n));
                    const float shrink = std::exp(m[i] - mt);  // (0 on the first block: m is -inf)
                    if (shrink != 1.f) {
                        l[i] *= shrink;
                        for (int64_t d = 0; d < Dv; ++d) acc[i * Dv + d] *= shrink;
                    }
                    l[i] += exp_sum(si, n, mt, true);
                    m[i] = mt;
                }
                weigh_any(vals, Dv, n, s.data(), B, acc.data(), G, Dv);
            }
            for (int64_t i = 0; i < G; ++i) {
                float* o = out + (p * G + i) * Dv;
                const bool any = l[i] > 0.f;
                for (int64_t d = 0; d < Dv; ++d) o[d] = any ? acc[i * Dv + d] / l[i] : 0.f;
                lse[p * G + i] = any ? m[i] + std::log(l[i]) : -std::numeric_limits<float>::infinity();
            }
        }
    }
}
"""
)

_ARGTYPES = ["const int64_t*"] * 4 + ["const float*", "float*", "float*"] + ["const int64_t"] * 9 + ["const float"]


def usable(dtype: torch.dtype) -> bool:
    """Does `attend` serve stores of this dtype here (built, checked, not switched off)?"""
    return os.environ.get(ENV_SWITCH, "1") != "0" and kernel_ok(dtype)


def attend(bases: tuple[torch.Tensor, torch.Tensor], blocks: torch.Tensor, counts: torch.Tensor, q: torch.Tensor,
           per_chunk: int, block_size: int, value_size: int, dtype: torch.dtype,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Rows' attention over keys at position 0 in host-store chunks: bases int64 [R, MC] row r's keys'
    chunk addresses, its values' (base_table), chunks [per_chunk, Hkv, B, D] and
    [per_chunk, Hkv, B, Dv] of `dtype`;
    blocks [R, Hkv, NB] long (row r's KV head h reads these blocks of its chunks), counts [R, NB]
    (of block j, its first counts[r, j] keys; 0: none); q [R, Hkv, g, D] float32.
    -> outputs [R, Hkv * g, Dv] float32, log-sum-exps [R, Hkv * g] (-inf where a row reads nothing)."""
    R, Hkv, g, D = q.shape
    key_base, val_base = bases
    MC = key_base.shape[1]
    out = torch.empty(R, Hkv * g, value_size)
    lse = torch.empty(R, Hkv * g)
    _kernel(dtype)(key_base, val_base, blocks.long().contiguous(), counts.long().contiguous(), q.float().contiguous(),
                   out, lse, R, Hkv, g, blocks.shape[-1], MC, per_chunk, block_size, D, value_size, scale)  # fmt: skip
    return out, lse


def base_table(bases: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """attend's bases from per row (its keys' chunk addresses, its values')."""
    MC = max(len(k) for k, _ in bases)
    return tuple(torch.tensor([b[i] + [0] * (MC - len(b[i])) for b in bases], dtype=torch.int64) for i in (0, 1))


def reference(keys: list[torch.Tensor], values: list[torch.Tensor], blocks: torch.Tensor, counts: torch.Tensor,
              q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`attend` in float64 for one row: its chunks keys [c] [N, Hkv, B, D] and values, blocks [Hkv, NB],
    counts [NB], q [Hkv, g, D] -> [Hkv * g, Dv], [Hkv * g]."""
    Hkv, g, _ = q.shape
    N = keys[0].shape[0]
    outs, lses = [], []
    for h in range(Hkv):
        pick = lambda chunks, j: chunks[int(blocks[h, j]) // N][int(blocks[h, j]) % N, h, : int(counts[j])]  # noqa: E731
        k = torch.cat([pick(keys, j) for j in range(blocks.shape[1])]).double()
        v = torch.cat([pick(values, j) for j in range(blocks.shape[1])]).double()
        s = q[h].double() @ k.T * scale  # [g, n]
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
    the vector width."""
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
            out, lse = attend(base_table(bases), blocks, counts, q, N, B, Dv, dtype, 0.3)
            for r, (k, v) in enumerate(rows):
                want_out, want_lse = reference(k, v, blocks[r], counts[r], q[r], 0.3)
                if not (torch.allclose(out[r].double(), want_out, atol=1e-4, rtol=1e-4)
                        and torch.allclose(lse[r].double(), want_lse, atol=1e-4, rtol=1e-5)):  # fmt: skip
                    return False
        return True

    return checked_build("far keys' C++ pass", "PyTorch", check)
