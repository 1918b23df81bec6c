"""Compile a Triton kernel for a CUDA architecture without a GPU (the ptxas of the installed triton), so the
GPU-only code paths (inline PTX, native rounding) are at least checked by the assembler in CI."""

from __future__ import annotations

import torch

if __package__ in (None, ""):  # run as a script: the repository root on the path
    import os as _os
    import sys as _sys

    _sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int8: "*i8",
            torch.uint8: "*u8", torch.int32: "*i32", torch.int64: "*i64"}


def compile_for_arch(kernel, arch: int, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 2):
    """``kernel`` (a ``triton.jit`` function) compiled for ``sm_<arch>``: ``args`` maps run-time argument names to
    tensors (their pointer type) or ints, ``constexprs`` the compile-time ones. Returns the compiled kernel (its
    ``asm`` holds ``ptx`` and ``cubin``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(args[name], torch.Tensor):
            signature[name] = _POINTER[args[name].dtype]
        elif isinstance(args[name], int):
            signature[name] = "i32"
        else:
            raise TypeError(f"{name}: give a tensor or an int, got {type(args[name]).__name__}")
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def _w4a4_kernels(arch: int) -> dict[str, str]:
    """PTX of the mixed-input W4A4 kernels' GPU-only paths, compiled for ``sm_<arch>``."""
    from deepcompressor.kernels import w4a4_mixed as mixed
    from deepcompressor.kernels.triton_utils import DEQUANT_BF16, DEQUANT_F16

    t = lambda dtype: torch.empty(1, dtype=dtype)
    i8, f16, f32, bf16 = torch.int8, torch.float16, torch.float32, torch.bfloat16
    ptx = {}
    for mode, dt in ((DEQUANT_BF16, bf16), (DEQUANT_F16, f16)):
        ptx[f"dequant_weight/{mode}"] = compile_for_arch(
            mixed._dequant_weight_kernel, arch,
            {"B": t(i8), "B_SCALES": t(f16), "B_ZERO": t(dt), "L1T": t(dt), "OUT": t(dt), "N": 1, "K": 1, "stride_on": 1},
            {"GPP": 4, "OUT_KIND": 1, "B_SIGNED": True, "HAS_ZERO": False, "HAS_LOWRANK": True, "RANK": 32, "BLOCK_N": 64,
                 "DEQ": mode}).asm["ptx"]
        ptx[f"mixed_gemm/{mode}"] = compile_for_arch(
            mixed._mixed_gemm_kernel, arch,
            {"XQ": t(dt), "DOWNP": t(f32), "B": t(i8), "B_SCALES": t(f16), "B_ZERO": t(dt), "L1T": t(dt), "BIAS": t(dt), "Y": t(dt),
                 "PART": t(f32), "COUNT": t(torch.int32), "M": 1, "N": 1, "K": 1, "stride_xm": 1, "stride_dc": 1, "stride_ym": 1},
            {"GPS": 8, "SPLITS": 4, "Y_KIND": 1 if mode == DEQUANT_BF16 else 0, "B_SIGNED": True, "HAS_ZERO": False,
                 "HAS_LOWRANK": True, "RANK": 32, "IEEE": False, "HAS_BIAS": True, "SPLIT": True, "GB": 8, "BLOCK_M": 16, "BLOCK_N": 64,
                 "DEQ": mode}).asm["ptx"]
    ptx["act_chunk"] = compile_for_arch(
        mixed._act_chunk_kernel, arch,
        {"X": t(bf16), "SMOOTH": t(bf16), "L2T": t(bf16), "STATIC_SCALE": t(f32), "STATIC_ZERO": t(f32), "XQ": t(bf16),
             "DOWN": t(f32), "M": 1, "K": 1, "stride_xm": 1, "stride_qm": 1, "stride_dc": 1, "stride_dm": 1},
        {"GPC": 4, "X_KIND": 1, "HAS_SMOOTH": True, "HAS_LOWRANK": True, "RANK": 32, "LR_IEEE": False, "DOWN_ROUND": False,
             "STATIC": False, "SYMMETRIC": True, "HAS_ZERO": False, "QMIN": -8, "QMAX": 7, "QSYM": 7.0, "SYM_ZERO": 0.0, "SCALE_KIND": 0,
             "TINY": 6.1e-5, "FMAX": 65504.0, "BLOCK_M": 32}).asm["ptx"]
    return ptx


if __name__ == "__main__":  # python tests/triton_target.py ARCH: instruction counts of the GPU paths, as JSON
    import json
    import sys

    counts = {name: {op: text.count(op) for op in ("fma.rn.bf16x2", "fma.rn.f16x2", "cvt.rni", "prmt.b32")}
              for name, text in _w4a4_kernels(int(sys.argv[1])).items()}
    print(json.dumps(counts))
