"""Compiles the Triton kernels to CUDA machine code (sm_90) without a GPU.

The interpreter (triton_cases.py) checks the numbers but none of the code
generation: loop-carried types, dot layouts, float64 math, shared memory. This
runs the real compiler down to ptxas, bundled with triton; nothing is launched.
Run as a script, with TRITON_INTERPRET unset (tests/test_triton_compile.py).
Prints JSON: the shared memory each kernel needs, in bytes.
"""

import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lminf_vllm import triton_lambda_attention as tla

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict, constants: dict):
    signature = dict(types, **{name: "constexpr" for name in constants})
    missing = set(fn.arg_names) - set(signature)
    assert not missing, f"signature lacks {missing}"
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=TARGET)


def main():
    dtype, head_size, group, segments = torch.bfloat16, 128, 4, 2
    tiles = tla.tile_sizes(group, head_size, dtype, decode_only=False)
    i32, ptr = "i32", "*bf16"
    main_kernel = compile_kernel(
        tla._lambda_attention_kernel,
        dict(q_ptr=ptr, kv_ptr=ptr, out_ptr=ptr, part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32",
             qsl_ptr="*i32", seq_lens_ptr="*i32", block_table_ptr="*i32", inv_freq_ptr="*fp64",
             num_seqs=i32, H=i32, stride_qt=i32, stride_qh=i32, stride_ot=i32, stride_oh=i32,
             stride_kb="i64", stride_kh=i32, stride_kr=i32, stride_bt=i32, scale_log2="fp32", G=i32, W=i32, C=i32),
        dict(HEAD_SIZE=head_size, ROT_DIM=64, IS_NEOX=True, GROUP=group, PAGE=16, PRECISION="tf32",
             NUM_SEGMENTS=segments, **tiles),
    )  # fmt: skip
    merge_kernel = compile_kernel(
        tla._merge_segments_kernel,
        dict(part_acc_ptr="*fp32", part_max_ptr="*fp32", part_sum_ptr="*fp32", out_ptr=ptr, qsl_ptr="*i32",
             num_seqs=i32, stride_ot=i32, stride_oh=i32, H=i32),
        dict(HEAD_SIZE=head_size, BLOCK_D=tiles["BLOCK_D"], NUM_SEGMENTS=segments, SEG_BLOCK=segments),
    )  # fmt: skip
    print(json.dumps({"attention": main_kernel.metadata.shared, "merge": merge_kernel.metadata.shared}))


if __name__ == "__main__":
    main()
