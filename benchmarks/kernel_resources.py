"""Compile the Triton kernels for a GPU that is not here and report what the compiler made of them.

Needs no GPU: Triton compiles for the named target with its bundled ptxas, and cuobjdump reads the
cubin. For every kernel variant it prints registers per thread, stack (spills), dynamic shared
memory and the count of Hopper matrix instructions (HGMMA) and asynchronous copies (LDGSTS).
Launches specialise pointers and sizes divisible by 16; the compile here assumes the same.

    python benchmarks/kernel_resources.py [--arch 90]
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, whatever the shell says

import fused_monitor  # noqa: E402  (benchmarks/fused_monitor.py: the fused monitor kernel)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from motab_kernels import paged_kv  # noqa: E402
from motab_kernels.divergence import kernels  # noqa: E402

# The package exports the function paged_attention under the module's name.
attention_module = importlib.import_module("motab_kernels.paged_attention")

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Integer arguments a real launch sees divisible by 16 (hidden sizes, strides, vocabularies
# rounded by model authors); pointers are 16-byte aligned.
ALIGNED = {
    "V",
    "DS",
    "DT",
    "stride_s",
    "stride_t",
    "stride_g",
    "stride_hs",
    "stride_ws",
    "stride_ht",
    "stride_wt",
    "stride_qt",
    "stride_qh",
    "stride_kslot",
    "stride_kh",
    "stride_vslot",
    "stride_vh",
    "stride_ot",
    "stride_oh",
    "block_size",
    "head_dim",
}

ROW_SIGNATURE = {
    "S": "*fp32",
    "T": "*fp32",
    "G": "*bf16",
    "TARGET": "*i64",
    "ROW_SCALE": "*fp32",
    "DIV": "*fp32",
    "S_LOGP": "*fp32",
    "T_LOGP": "*fp32",
    "T_RANK": "*i32",
    "T_ENT": "*fp32",
    "V": "i32",
    "stride_s": "i32",
    "stride_t": "i32",
    "stride_g": "i32",
    "s_scale": "fp32",
    "t_scale": "fp32",
    "s_cap": "fp32",
    "t_cap": "fp32",
    "inv_temp": "fp32",
    "beta": "fp32",
    "KIND": "constexpr",
    "HAS_TARGET": "constexpr",
    "WANT_GRAD": "constexpr",
    "S_HAS_CAP": "constexpr",
    "T_HAS_CAP": "constexpr",
    "BV": "constexpr",
}
MONITOR_SIGNATURE = {
    "HS": "*bf16",
    "WS": "*bf16",
    "BS": "*fp32",
    "HT": "*bf16",
    "WT": "*bf16",
    "BT": "*fp32",
    "TARGET": "*i64",
    "T_TARGET": "*fp32",
    "PART": "*fp32",
    "PART_RANK": "*i32",
    "N": "i32",
    "V": "i32",
    "DS": "i32",
    "DT": "i32",
    "SPLITS": "i32",
    "stride_hs": "i32",
    "stride_ws": "i32",
    "stride_ht": "i32",
    "stride_wt": "i32",
    "s_scale": "fp32",
    "t_scale": "fp32",
    "s_cap": "fp32",
    "t_cap": "fp32",
    "inv_temp": "fp32",
    "N_BUCKET": "i32",
    "KIND": "constexpr",
    "HAS_TARGET": "constexpr",
    "HAS_BS": "constexpr",
    "HAS_BT": "constexpr",
    "S_HAS_CAP": "constexpr",
    "T_HAS_CAP": "constexpr",
    "DOT_FP32": "constexpr",
    "PRECISION": "constexpr",
    "BM": "constexpr",
    "BV": "constexpr",
    "BK": "constexpr",
}


ATTENTION_SIGNATURE = {
    "Q": "*bf16",
    "K": "*bf16",
    "V": "*bf16",
    "OUT": "*bf16",
    "BLOCK_TABLE": "*i32",
    "TILES": "*i32",
    "POSITIONS": "*i32",
    "stride_qt": "i32",
    "stride_qh": "i32",
    "stride_kslot": "i32",
    "stride_kh": "i32",
    "stride_vslot": "i32",
    "stride_vh": "i32",
    "stride_ot": "i32",
    "stride_oh": "i32",
    "stride_table": "i32",
    "scale": "fp32",
    "window": "i32",
    "head_dim": "i32",
    "block_size": "i32",
    "G": "constexpr",
    "HAS_WINDOW": "constexpr",
    "DOT_FP32": "constexpr",
    "PRECISION": "constexpr",
    "BM": "constexpr",
    "BN": "constexpr",
    "BD": "constexpr",
}
MOVE_SIGNATURE = {
    "PLAN": "*i32",
    "BLOCK_TABLE": "*i32",
    "FREE_STACK": "*i32",
    "SEQ_LENS": "*i32",
    "SLOTS": "*i64",
    "stride_table": "i32",
    "ALLOCATE": "constexpr",
    "BLOCK_SIZE": "constexpr",
    "PLAN_WIDTH": "constexpr",
    "BJ": "constexpr",
    "BT": "constexpr",
}


def resources(fn, signature, constexprs, num_warps, num_stages, arch):
    attrs = {
        (fn.arg_names.index(name),): [["tt.divisibility", 16]]
        for name, kind in signature.items()
        if kind.startswith("*") or name in ALIGNED
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True, text=True
        ).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", cubin.name], capture_output=True, text=True)
    fields = dict(item.split(":") for line in usage.splitlines() if "REG:" in line for item in line.split())
    return {
        "regs": int(fields.get("REG", -1)),
        "stack": int(fields.get("STACK", -1)),
        "shared": kernel.metadata.shared,
        "hgmma": sass.stdout.count("HGMMA"),
        "ldgsts": sass.stdout.count("LDGSTS"),
    }


def row(kernel, variant, warps, stages, r):
    return (
        f"| {kernel} | {variant} | {warps} | {stages} | {r['regs']} | {r['stack']} | {r['shared']} | "
        f"{r['hgmma']} | {r['ldgsts']} |"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    args = parser.parse_args(argv)
    print(f"sm_{args.arch}, triton {triton.__version__}")
    print("| kernel | variant | warps | stages | regs | stack | shared B | HGMMA | LDGSTS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, name in ((0, "fkl"), (1, "rkl"), (2, "jsd")):
        for want_grad in (False, True):
            constexprs = dict(KIND=kind, HAS_TARGET=True, WANT_GRAD=want_grad, S_HAS_CAP=False, T_HAS_CAP=False)
            constexprs["BV"] = 4096
            r = resources(kernels.divergence_rows_kernel, ROW_SIGNATURE, constexprs, 8, 3, args.arch)
            variant = f"{name}{' +grad' if want_grad else ''} BV=4096"
            print(row("rows", variant, 8, "-", r))
    for kind, name in ((0, "fkl"), (1, "rkl")):
        for config in fused_monitor.monitor_configs():
            constexprs = dict(KIND=kind, HAS_TARGET=True, HAS_BS=False, HAS_BT=False, S_HAS_CAP=False)
            constexprs.update(T_HAS_CAP=False, DOT_FP32=False, PRECISION="tf32", **config.kwargs)
            r = resources(
                fused_monitor.fused_monitor_kernel,
                MONITOR_SIGNATURE,
                constexprs,
                config.num_warps,
                config.num_stages,
                args.arch,
            )
            tiles = "×".join(str(config.kwargs[k]) for k in ("BM", "BV", "BK"))
            print(row("fused monitor", f"{name} bf16 {tiles}", config.num_warps, config.num_stages, r))
    for group, head_dim, block_q in ((6, 128, 1), (6, 128, 16), (7, 128, 1), (4, 64, 16)):
        block_m = max(16, 1 << (block_q * group - 1).bit_length())
        constexprs = dict(G=group, HAS_WINDOW=False, DOT_FP32=False, PRECISION="tf32", BM=block_m, BN=64)
        constexprs["BD"] = head_dim
        warps = attention_module.attention_warps(block_m, head_dim)
        r = resources(attention_module._paged_attention_kernel, ATTENTION_SIGNATURE, constexprs, warps, 3, args.arch)
        print(row("paged attention", f"bf16 G={group} D={head_dim} queries/row={block_q}", warps, 3, r))
    for allocate in (True, False):
        constexprs = dict(ALLOCATE=allocate, BLOCK_SIZE=16, PLAN_WIDTH=paged_kv.PLAN_WIDTH, BJ=64, BT=64)
        r = resources(paged_kv._move_blocks_kernel, MOVE_SIGNATURE, constexprs, 4, 3, args.arch)
        print(row("move blocks", "allocate" if allocate else "release", 4, 3, r))


if __name__ == "__main__":
    main()
