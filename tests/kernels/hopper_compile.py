"""Compile every kernel variant for Hopper (sm_90) with triton's own ptxas, no GPU needed: catches what the
interpreter lets through (types of loop-carried values, dot shapes, constexpr misuse). Run as a script in a fresh
process (the interpreter must be off when triton is imported); prints one line per variant."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with the interpreter off"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from specrelay.kernels import kv_compact, rope_shift, spec_accept, tree_attention  # noqa: E402


def compile_variant(kernel, types: dict[str, str], constexprs: dict[str, object]) -> int:
    signature, constants = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            constants[(i,)] = constexprs[name]
        else:
            signature[name] = types.get(name, "i32")
    # as at launch, where triton marks pointers and integers divisible by 16 (strides, block_size) as such
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if name not in constexprs and (signature[name].startswith("*") or name.startswith("stride")
                                            or name == "block_size")}  # fmt: skip
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return len(triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["cubin"])


def main() -> int:
    variants = []
    for dtype, precision in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
        for has_mask in (True, False):
            types = {n: f"*{dtype}" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
            types.update(block_tables_ptr="*i32", context_lens_ptr="*i32", cu_query_lens_ptr="*i32",
                         mask_ptr="*u8", mask_starts_ptr="*i32", partial_acc_ptr="*fp32", partial_ml_ptr="*fp32",
                         positions_ptr="*i64", scale_log2="fp32")  # fmt: skip
            for num_splits in (1, 4):
                consts = dict(GROUP=4, BLOCK_Q=16, BLOCK_R=64, BLOCK_N=64, HEAD_DIM=64, BLOCK_D=64,
                              HAS_MASK=has_mask, DOT_PRECISION=precision, DOT_IN_FP32=False, NUM_SPLITS=num_splits)
                variants.append((f"tree_attention {dtype} mask={has_mask} splits={num_splits}",
                                 tree_attention._build(False)[0], types, consts))  # fmt: skip
        variants.append((f"tree_attention combine {dtype}", tree_attention._build(False)[1],
                         dict(partial_acc_ptr="*fp32", partial_ml_ptr="*fp32", out_ptr=f"*{dtype}"),
                         dict(NUM_SPLITS=5, SPLITS_P2=8, HEAD_DIM=64, BLOCK_D=64)))  # fmt: skip
    for probs in ("fp32", "bf16"):
        for greedy in (True, False):
            types = dict(tokens_ptr="*i64", parents_ptr="*i64", cu_nodes_ptr="*i64", p_ptr=f"*{probs}",
                         q_ptr=f"*{probs}", u_ptr="*fp32", final_u_ptr="*fp32", residual_ptr="*fp32",
                         draft_ptr="*fp32", num_accepted_ptr="*i64", accepted_ptr="*i64",
                         next_token_ptr="*i64")  # fmt: skip
            variants.append((f"spec_accept {probs} greedy={greedy}", spec_accept._build(False), types,
                             dict(GREEDY=greedy, BLOCK_V=1024)))  # fmt: skip
    variants.append(("rope_shift bf16", rope_shift._build(False),
                     dict(k_ptr="*bf16", slots_ptr="*i64", delta_ptr="*i64", inv_freq_ptr="*fp32"),
                     dict(HALF=32, BLOCK_H=8, BLOCK_HALF=32)))  # fmt: skip
    variants.append(("kv_compact bf16", kv_compact._build(False),
                     dict(k_ptr="*bf16", v_ptr="*bf16", src_ptr="*i64", dst_ptr="*i64"),
                     dict(BLOCK_N=64, BLOCK_C=64)))  # fmt: skip
    for name, kernel, types, consts in variants:
        print(f"{name}: {compile_variant(kernel, types, consts)} bytes of sm_90 cubin", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
