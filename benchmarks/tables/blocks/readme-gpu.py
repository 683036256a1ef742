"""README: the H200 kernels' speed-ups per length, decode and prefill files side by side, and
the correctness summary (counts and maxima over gpu_check.json)."""

from tables.commands import gpu_run_command
from tables.common import GPU, ratio, table, tokens
from tables.gpu import gpu_check_summary, gpu_rows


def render(doc) -> str:
    dec, pre = f"{GPU}/gpu_kernel_decode.json", f"{GPU}/gpu_kernel_prefill.json"
    d, p = gpu_rows(dec), gpu_rows(pre)
    rows = []
    for (mode, n), k in sorted(d.items()):
        q = p.get(("prefill", n), {})
        rows.append([tokens(n), ratio(k["sdpa-flash-gqa"]["us"] / k["lambda"]["us"]),
                     ratio(q["sdpa-flash-gqa"]["ms"] / q["lambda"]["ms"]) if q else ""])
    return "\n\n".join([
        table(["n", "decode: Λ speed-up over FlashAttention", "prefill: Λ speed-up"], rows),
        gpu_check_summary(),
        doc.image(f"{GPU}/gpu_kernel.png", "Triton kernels vs FlashAttention on an H200"),
        doc.source(dec, gpu_run_command(), f", [`{pre}`]({doc.link(pre)})")])
