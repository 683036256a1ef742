r"""The top-k mass score of decode rows in one layer: PyTorch's eager ops against the C++ pass.

attention.mass_scores_rows reads every middle key of each row (paths/topk/mass_kernel.py). This
times it both ways, for one row and for 8 rows at once (as a step of 8 requests scores them), on
SmolLM2-135M's shape (3 KV heads of 64 channels, 9 query heads, blocks of 128, bfloat16 keys in
the host store's chunks of 16 blocks) at several context lengths, with as many rows' keys as it
takes to leave every cache (as in an engine, where a row's keys at 16k are 6 MB and eight rows'
are 48 MB): each call scores the next rows' keys. Random keys; the two ways agree to float32
rounding (checked). Beside them, the floor: a C++ loop that only reads the same keys (converted
to float32 and summed, OpenMP over the pieces), which is what memory allows; and the sketch: the
engine's pass for topk_score "mass_int8" over the 8-bit copy of the same keys the store would
hold (one scale a key and KV head, the query in 8 bits too, the products by AVX-512 VNNI:
mass_kernel.sketch_shares), held to its eager ops (sketch.block_lse_eager). Prints ms per row
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
from lminf_vllm.paths.topk import attention, mass_kernel, sketch  # noqa: E402


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
    read, vnni = read_floor(), mass_kernel.sketch_usable(g, B, D)
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
            rows_sk = [[sketch.sketch_keys(p) for p in row] for row in rows] if vnni else None  # (the same keys in 8 bits)
            calls = {1: lambda c: attention.mass_scores_rows(qs[:1], [rows[c % nrows]], scale),
                     8: lambda c: attention.mass_scores_rows(qs, [rows[(8 * c + j) % nrows] for j in range(8)], scale)}
            floor = {1: lambda c: read(rows[c % nrows]),
                     8: lambda c: read([p for j in range(8) for p in rows[(8 * c + j) % nrows]])}
            sketches = {1: lambda c: attention.sketch_scores_rows(qs[:1], [rows_sk[c % nrows]], scale),
                        8: lambda c: attention.sketch_scores_rows(qs, [rows_sk[(8 * c + j) % nrows] for j in range(8)],
                                                                  scale)}  # fmt: skip
            times = {}
            for _ in range(args.rounds):  # in alternation: the machine's drift falls on all
                for way, switch in [w for w in (("eager", "0"), ("cpp", "1"), ("sketch", "1"), ("floor", "1"))
                                    if vnni or w[0] != "sketch"]:  # fmt: skip
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
            if vnni:
                sk_rows = [rows_sk[j] for j in range(8)]
                fast = attention.sketch_scores_rows(qs, sk_rows, scale)
                os.environ[mass_kernel.ENV_SWITCH] = "0"
                sk_diff = (fast - attention.sketch_scores_rows(qs, sk_rows, scale)).abs().max().item()
                os.environ[mass_kernel.ENV_SWITCH] = "1"
                if not sk_diff < 1e-3:
                    sys.exit(f"the 8-bit pass disagrees with its eager ops by {sk_diff}")
            row = {"middle_tokens": blocks * B, "key_mb_per_row": round(per_row / 2**20, 2), "rows_cycled": nrows,
                   "max_abs_diff": diff, "sketch_max_abs_diff_vs_eager": sk_diff}  # fmt: skip
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
                     "sketch": "topk_score mass_int8: uint8 keys + 128 in tiles of 16, a float32 scale per key "
                               "and KV head; int8 queries"},
           "rows": rows_out}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
