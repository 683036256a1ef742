"""The H200 kernels before the split-K change: two files in one table, units by mode."""

from tables.commands import command
from tables.common import GPU, load, num, table, tokens
from tables.gpu import gpu_rows


def render(doc) -> str:
    rel, b64 = f"{GPU}/gpu_kernel_before_split.json", f"{GPU}/gpu_kernel_batch64_before_split.json"
    rows = []
    for (mode, n), k in sorted(gpu_rows(rel).items()):
        lam, fa = k["lambda"], k["sdpa-flash-gqa"]
        unit = "us" if mode == "decode" else "ms"
        rows.append([mode, tokens(n), load(rel)["meta"]["args"]["batch"] if mode == "decode" else 1,
                     f"{num(lam[unit], 1 if unit == 'us' else 2)} {unit.replace('us', 'µs')}",
                     f"{num(fa[unit], 1 if unit == 'us' else 2)} {unit.replace('us', 'µs')}"])
    for (mode, n), k in sorted(gpu_rows(b64).items()):
        rows.append([mode, tokens(n), k["lambda"]["batch"], f"{num(k['lambda']['us'])} µs",
                     f"{num(k['sdpa-flash-gqa']['us'])} µs"])
    m, m64 = load(rel)["meta"]["args"], load(b64)["meta"]["args"]
    return "\n\n".join([
        table(["mode", "n", "batch", "Λ (one launch)", "flash"], rows),
        doc.source(rel, command("benchmarks/gpu_kernel.py", m, rel),
                   " (at the earlier version of the kernels)"),
        doc.source(b64, command("benchmarks/gpu_kernel.py", m64, b64), " (likewise)")])
