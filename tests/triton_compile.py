"""Compiles the Triton kernels to CUDA machine code (sm_90) without a GPU.

The interpreter (triton_cases.py) checks the numbers but none of the code
generation: loop-carried types, dot layouts, float64 math, shared memory,
registers. This runs the real compiler down to ptxas, bundled with triton;
nothing is launched. Pointers and strides are marked divisible by 16, as
Triton's launcher does for the real (aligned) arguments, so loads vectorise as
they will on the GPU. Run as a script, with TRITON_INTERPRET unset
(tests/test_triton_compile.py). Prints JSON: per kernel and tile setting, the
shared memory (bytes), registers per thread and spill stack (bytes), read from
the cubin with the bundled cuobjdump.
"""

import json
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lminf_vllm.paths.triton import kernels as tla

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
INT_PTRS = {"qsl_ptr", "seq_lens_ptr", "block_table_ptr"}


def arg_type(name: str) -> str:
    if name == "inv_freq_ptr":
        return "*fp64"
    if name in INT_PTRS:
        return "*i32"
    if name.startswith(("part_", "g_")):
        return "*fp32"
    if name.endswith("_ptr"):
        return "*bf16"
    return "fp32" if name == "scale_log2" else "i32"


def compile_kernel(fn, constants: dict) -> dict:
    signature = {n: "constexpr" if n in constants else arg_type(n) for n in fn.arg_names}
    aligned = [n for n in fn.arg_names if n.endswith("_ptr") or n.startswith("stride_")]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs), target=TARGET)
    usage = {"shared": kernel.metadata.shared}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    usage["registers"] = int(re.search(r"REG:(\d+)", text).group(1))
    usage["spill_stack"] = int(re.search(r"STACK:(\d+)", text).group(1))
    return usage


def main():
    head_size, group, segments = 128, 4, 4
    out = {}
    for mode in ("decode", "prefill"):
        tiles = tla.tile_sizes(group, head_size, torch.bfloat16, decode_only=mode == "decode")
        common = dict(HEAD_SIZE=head_size, BLOCK_D=tiles["BLOCK_D"], GROUP=group, BLOCK_Q=tiles["BLOCK_Q"],
                      BLOCK_M=tiles["BLOCK_M"], PAGE=16, PRECISION="tf32")  # fmt: skip
        seg = segments if mode == "decode" else 1
        out[f"window-{mode}"] = compile_kernel(
            tla._window_kernel, dict(common, BLOCK_N=tiles["BLOCK_N"], NUM_SEGMENTS=seg, HAS_GLOBAL=True)
        )
        out[f"global-{mode}"] = compile_kernel(
            tla._global_branch_kernel, dict(common, ROT_DIM=64, IS_NEOX=True, BLOCK_G=tiles["BLOCK_G"])
        )
    out["merge"] = compile_kernel(
        tla._merge_segments_kernel,
        dict(HEAD_SIZE=head_size, BLOCK_D=128, NUM_SEGMENTS=segments, SEG_BLOCK=segments, HAS_GLOBAL=True),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
