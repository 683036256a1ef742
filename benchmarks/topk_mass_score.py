r"""The top-k mass score of decode rows in one layer: PyTorch's eager ops against the C++ pass.

attention.mass_scores_rows reads every middle key of each row (paths/topk/mass_kernel.py). This
times it both ways, for one row and for 8 rows at once (as a step of 8 requests scores them), on
SmolLM2-135M's shape (3 KV heads of 64 channels, 9 query heads, blocks of 128, bfloat16 keys in
the host store's chunks of 16 blocks) at several context lengths, with as many rows' keys as it
takes to leave every cache (as in an engine, where a row's keys at 16k are 6 MB and eight rows'
are 48 MB): each call scores the next rows' keys. Random keys; the two ways agree to float32
rounding (checked). Beside them, the floor: a C++ loop that only reads the same keys (converted
to float32 and summed, OpenMP over the pieces), which is what memory allows; and the sketch: the
same pass over an 8-bit copy of the same keys (one scale a key and KV head, the query in 8 bits
too, the products by AVX-512 VNNI), which the engine does not have: what a scoring copy in 8 bits
would cost (docs/topk-contract.md), held to its own float64 reference. Prints ms per row
(the fastest of --rounds rounds, the ways in alternation) and GB/s of keys read, and writes JSON.

    python benchmarks/topk_mass_score.py --out benchmarks/results/topk-mass-score.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lminf_vllm.cpu_isa import describe  # noqa: E402
from lminf_vllm.paths.topk import attention, mass_kernel  # noqa: E402


_READ = r"""
// Every key of each piece t (counts[t] bfloat16 values at addr[t]), read and summed in float32.
extern "C" void kernel(const int64_t* addr, const int64_t* counts, float* out, const int64_t T) {
    #pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
        const KT* p = reinterpret_cast<const KT*>(addr[t]);
        Vec2 a(0.f);
        for (int64_t x = 0; x + Vec2::size() <= counts[t]; x += Vec2::size()) a = a + load_keys(p + x);
        out[t] = at::vec::vec_reduce_all<float, 2>([](Vec& x, Vec& y) { return x + y; }, a);
    }
}
"""


_SKETCH = r"""
// The mass pass over an 8-bit sketch of the keys (what a scoring copy in 8 bits would cost): per
// block t ([Hkv, B, 64] uint8 keys k + 128 at addr[t], their scales [Hkv, B] float at saddr[t]) and
// query head i of KV head h (int8 q8, scale qs, qo = 128 * sum(q8)): out[row, h, i, col] = the
// block's log-sum-exp of scale * qs * ks[b] * (q8 . k8[b]), the products by AVX-512 VNNI (64 a
// vpdpbusd), 16 keys' sums in one lane_sums16. D = 64 only, G <= 4, B a multiple of 16.
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
template <int NG>
__attribute__((target("avx512vnni"))) static void sketch_block(const uint8_t* keys, const float* ks,
        const __m512i* qv, const float* qs, const int32_t* qo, int64_t B, float scale, float* s) {
    for (int64_t b0 = 0; b0 + 16 <= B; b0 += 16) {
        __m512 part[NG][16];
        for (int kk = 0; kk < 16; ++kk) {
            const __m512i k = _mm512_loadu_si512(keys + (b0 + kk) * 64);
            for (int i = 0; i < NG; ++i)
                part[i][kk] = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), k, qv[i]));
        }
        const __m512 kscale = _mm512_loadu_ps(ks + b0);
        for (int i = 0; i < NG; ++i) {
            const __m512 dots = _mm512_sub_ps(lane_sums16(part[i]), _mm512_set1_ps(static_cast<float>(qo[i])));
            _mm512_storeu_ps(s + i * B + b0, _mm512_mul_ps(_mm512_mul_ps(dots, kscale), _mm512_set1_ps(scale * qs[i])));
        }
    }
}
#endif

extern "C" void kernel(const int64_t* addr, const int64_t* saddr, const int64_t* row, const int64_t* col,
                       const int8_t* q8, const float* qs, const int32_t* qo, float* out, const int64_t T,
                       const int64_t Hkv, const int64_t G, const int64_t B, const int64_t C, const float scale) {
#if defined(CPU_CAPABILITY_AVX512)
    #pragma omp parallel
    {
        std::vector<float> s(G * B);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t h = 0; h < Hkv; ++h) {
                const int64_t p = row[t] * Hkv + h;
                __m512i qv[4];
                for (int64_t i = 0; i < G; ++i) qv[i] = _mm512_loadu_si512(q8 + (p * G + i) * 64);
                const uint8_t* keys = reinterpret_cast<const uint8_t*>(addr[t]) + h * B * 64;
                const float* ks = reinterpret_cast<const float*>(saddr[t]) + h * B;
                switch (G) {
                    case 1: sketch_block<1>(keys, ks, qv, qs + p * G, qo + p * G, B, scale, s.data()); break;
                    case 2: sketch_block<2>(keys, ks, qv, qs + p * G, qo + p * G, B, scale, s.data()); break;
                    case 3: sketch_block<3>(keys, ks, qv, qs + p * G, qo + p * G, B, scale, s.data()); break;
                    default: sketch_block<4>(keys, ks, qv, qs + p * G, qo + p * G, B, scale, s.data());
                }
                for (int64_t i = 0; i < G; ++i) {
                    const float m = max_of(s.data() + i * B, B);
                    out[(p * G + i) * C + col[t]] = m + std::log(exp_sum(s.data() + i * B, B, m, false));
                }
            }
        }
    }
#endif
}
"""


def sketch_pass():
    """A function scoring rows of 8-bit key sketches with the _SKETCH pass: rows[r] a list of pieces
    (uint8 keys [n, Hkv, B, 64], float scales [n, Hkv, B]); q [R, Hkv, g, 64] float -> the block
    log-sum-exps [R, Hkv, g, C] (-inf past a row's blocks), and the same in float64 (the reference).
    None where the CPU has no AVX-512 VNNI."""
    if "avx512_vnni" not in Path("/proc/cpuinfo").read_text():
        return None
    source = (mass_kernel.LOADS + _SKETCH).replace("KEY_TYPE", mass_kernel.TYPES[torch.bfloat16])
    kernel = mass_kernel.load_pybinding(["const int64_t*"] * 4 + ["const int8_t*", "const float*", "const int32_t*",
                                        "float*"] + ["const int64_t"] * 5 + ["const float"], source)  # fmt: skip

    def score(rows, q, scale, reference=False):
        R, Hkv, g, D = q.shape
        assert D == 64 and g <= 4, "the sketch pass is written for 64 channels and at most 4 query heads a KV head"
        qs = q.abs().amax(-1).clamp(min=1e-30) / 127
        q8 = torch.round(q / qs[..., None]).to(torch.int8)
        C = max(sum(k.shape[0] for k, _ in pieces) for pieces in rows)
        out = torch.full((R, Hkv, g, C), float("-inf"))
        if reference:
            for r, pieces in enumerate(rows):
                k = torch.cat([k for k, _ in pieces]).double() - 128
                ks = torch.cat([s for _, s in pieces]).double()
                dots = torch.einsum("nhbd,hgd->nhgb", k, q8[r].double()) * ks[:, :, None] * qs[r].double()[None, ..., None]
                out[r, ..., : k.shape[0]] = torch.logsumexp(dots * scale, -1).permute(1, 2, 0).float()
            return out
        per_row = [len(pieces) for pieces in rows]  # (the engine pass's tables: the same Python work a call)
        addr, row, col = mass_kernel.block_table([k for pieces in rows for k, _ in pieces], per_row)
        saddr = mass_kernel.block_table([ks for pieces in rows for _, ks in pieces], per_row)[0]
        qo = (128 * q8.to(torch.int32).sum(-1)).to(torch.int32).contiguous()  # (sum widens to int64)
        kernel(addr, saddr, row, col, q8.contiguous(), qs.contiguous(), qo, out, len(addr), Hkv, g,
               rows[0][0][0].shape[2], C, scale)  # fmt: skip
        return out

    return score


def sketched(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [n, Hkv, B, D] -> (uint8 keys k8 + 128, float32 scales [n, Hkv, B]): one scale a key and head."""
    k = keys.float()
    ks = k.abs().amax(-1).clamp(min=1e-30) / 127
    return (torch.round(k / ks[..., None]) + 128).to(torch.uint8).contiguous(), ks.contiguous()


def read_floor():
    """A function that reads every key of a list of pieces (contiguous, bfloat16) with the floor loop."""
    source = (mass_kernel.LOADS + _READ).replace("KEY_TYPE", mass_kernel.TYPES[torch.bfloat16])
    kernel = mass_kernel.load_pybinding(["const int64_t*", "const int64_t*", "float*", "const int64_t"], source)
    out = torch.empty(4096)

    def read(pieces):
        addr = torch.tensor([p.data_ptr() for p in pieces])
        kernel(addr, torch.tensor([p.numel() for p in pieces]), out, len(pieces))

    return read


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536], help="middle tokens per row")
    p.add_argument("--cache-mb", type=int, default=256, help="keys cycled through, MB (more than the caches)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/topk-mass-score.json"))
    args = p.parse_args(argv)
    Hkv, g, D, B, N, scale = 3, 3, 64, 128, 16, 0.125
    read, sketch = read_floor(), sketch_pass()
    rows_out = []
    with torch.inference_mode():
        for length in args.lengths:
            blocks = length // B
            per_row = blocks * Hkv * B * D * 2
            nrows = max(16, args.cache_mb * 2**20 // per_row)
            gen = torch.Generator().manual_seed(length)
            rows = [[torch.randn(min(N, blocks - a), Hkv, B, D, generator=gen).bfloat16() for a in range(0, blocks, N)]
                    for _ in range(nrows)]  # fmt: skip
            qs = torch.randn(8, Hkv * g, D, generator=gen)
            rows_sk = [[sketched(p) for p in row] for row in rows] if sketch else None  # (the same keys in 8 bits)
            q4 = qs.view(8, Hkv, g, D)
            calls = {1: lambda c: attention.mass_scores_rows(qs[:1], [rows[c % nrows]], scale),
                     8: lambda c: attention.mass_scores_rows(qs, [rows[(8 * c + j) % nrows] for j in range(8)], scale)}
            floor = {1: lambda c: read(rows[c % nrows]),
                     8: lambda c: read([p for j in range(8) for p in rows[(8 * c + j) % nrows]])}
            sketches = {1: lambda c: sketch([rows_sk[c % nrows]], q4[:1], scale),
                        8: lambda c: sketch([rows_sk[(8 * c + j) % nrows] for j in range(8)], q4, scale)}
            times = {}
            for _ in range(args.rounds):  # in alternation: the machine's drift falls on all
                for way, switch in [w for w in (("eager", "0"), ("cpp", "1"), ("sketch", "1"), ("floor", "1"))
                                    if sketch or w[0] != "sketch"]:  # fmt: skip
                    os.environ[mass_kernel.ENV_SWITCH] = switch
                    for batch, call in {"floor": floor, "sketch": sketches}.get(way, calls).items():
                        call(0)  # (warm)
                        t0 = time.perf_counter()
                        for c in range(args.calls // batch):
                            call(c)
                        ms = (time.perf_counter() - t0) / (args.calls // batch * batch) * 1e3
                        times[way, batch] = min(times.get((way, batch), ms), ms)  # the fastest round
            os.environ[mass_kernel.ENV_SWITCH] = "0"
            eager = calls[8](0)
            os.environ[mass_kernel.ENV_SWITCH] = "1"
            diff = (calls[8](0) - eager).abs().max().item()
            sk_diff = None
            if sketch:
                sk_rows = [rows_sk[j] for j in range(8)]
                sk_diff = (sketch(sk_rows, q4, scale) - sketch(sk_rows, q4, scale, reference=True)).abs().max().item()
                if not sk_diff < 1e-3:  # (also where the pass was built without AVX-512 and wrote nothing)
                    sys.exit(f"the 8-bit sketch pass disagrees with its float64 reference by {sk_diff}")
            row = {"middle_tokens": blocks * B, "key_mb_per_row": round(per_row / 2**20, 2), "rows_cycled": nrows,
                   "max_abs_diff": diff, "sketch_max_abs_diff_vs_float64": sk_diff}  # fmt: skip
            sketch_bytes = blocks * Hkv * B * (D + 4)  # uint8 channels and a float32 scale a key and head
            for batch in calls:
                e, c, f, k = (times.get((w, batch), float("nan")) for w in ("eager", "cpp", "floor", "sketch"))
                gbs = lambda ms, n=per_row: round(n / ms / 1e6, 1)  # noqa: E731 (GB/s of keys read)
                row[f"rows_{batch}"] = {"eager_ms_per_row": round(e, 3), "cpp_ms_per_row": round(c, 3),
                                        "eager_x_cpp": round(e / c, 2), "floor_ms_per_row": round(f, 3),
                                        "sketch_ms_per_row": round(k, 3), "cpp_x_sketch": round(c / k, 2),
                                        "eager_gb_s": gbs(e), "cpp_gb_s": gbs(c), "floor_gb_s": gbs(f),
                                        "sketch_gb_s": gbs(k, sketch_bytes)}  # fmt: skip
            rows_out.append(row)
            print(row, flush=True)
    doc = {"cpu": describe(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "command": "python benchmarks/topk_mass_score.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "shape": {"Hkv": Hkv, "g": g, "D": D, "B": B, "chunk_blocks": N, "dtype": "bfloat16",
                     "sketch": "uint8 keys + 128, a float32 scale per key and KV head; int8 queries"},
           "rows": rows_out}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
