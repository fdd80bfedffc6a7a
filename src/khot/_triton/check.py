"""Compile every Triton kernel of khot for a GPU without one: ``python -m khot._triton.check``.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not that they
compile: the GPU compiler is stricter (types of loop-carried values, constexpr globals, ...).
Triton compiles to PTX and a cubin for any target without a device, so this module builds
representative variants of each kernel (every key width, output kind and pass) for an H100-class
target (``sm_90``) and reports those that fail. Run it with ``TRITON_INTERPRET`` unset; name variants
(see :func:`variants`) to build only those.
"""

from __future__ import annotations

import math
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import exact, router, sigmoid

__all__ = ["variants", "compile_all"]

TARGET = GPUTarget("cuda", 90, 32)


def variants():
    """``(name, kernel, argument types, constexprs)`` of the variants to build."""
    out = []
    row_types = ["i32", "i32", "i32", "i64", "i64", "i64"]  # k, n, inner and x's three strides
    for dtype, (bits, kind) in [("fp32", (32, 0)), ("bf16", (16, 3)), ("fp16", (16, 0)), ("fp64", (64, 0)), ("i8", (8, 1)), ("i64", (64, 1)), ("u8", (8, 2))]:
        flags = dict(BITS=bits, KIND=kind, LARGEST=True, MAGNITUDE=kind != 2)
        for kind_out, out_type in [(0, "*i8"), (1, "*" + dtype), (2, "*i64")]:
            ce = dict(BLOCK=1024, HAS_KS=True, OUT=kind_out, **flags)
            out.append((f"exact row {dtype} out={kind_out}", exact._row_kernel, ["*" + dtype, "*i64", out_type, *row_types], ce))
        for p in range(bits // 8 + 2):
            ce = dict(PASS=p, FOUND=min(p, bits // 8), CHUNKS=64, BLOCK=exact.CHUNK, HAS_KS=False, OUT=0, **flags)
            types = ["*" + dtype, "*i64", "*i8", "*i32", "*i32", *row_types, "i32"]
            out.append((f"exact chunk {dtype} pass {p}", exact._chunk_pass, types, ce))
    for dtype in ("fp32", "bf16", "fp64"):
        for one in (True, False):
            ce = dict(TOL_W=4e-6, TOL_K=math.inf, F64=dtype == "fp64", BLOCK=sigmoid.BLOCK, ONE_BLOCK=one, NEWTON=12, EVALUATIONS=78)
            types = ["*" + dtype, "*fp64", "*fp64", "*" + dtype, "i32", "i64", "i64"]
            out.append((f"sigmoid {dtype} one block={one}", sigmoid._forward_kernel, types, ce))
        x, layout = "*" + dtype, dict(F64=dtype == "fp64", BLOCK=sigmoid.BLOCK)
        steps = dict(TOL_W=4e-6, NEWTON=12, EVALUATIONS=78)
        out += [
            (f"sigmoid spread stats {dtype}", sigmoid._stats_pass, [x, "*fp64", "*i64", "i32", "i64", "i64"], layout),
            (f"sigmoid spread start {dtype}", sigmoid._start_kernel, ["*fp64", "*fp64", "*fp64", "*i64", "*fp64", "i32"], dict(TOL_K=math.inf)),
            (f"sigmoid spread evaluation {dtype}", sigmoid._eval_pass, [x, "*fp64", "*fp64", "*fp64", "i32", "i64", "i64"], layout),
            (f"sigmoid spread update {dtype}", sigmoid._update_kernel, ["*fp64", "*fp64", "*fp64"], steps),
            (f"sigmoid spread finish {dtype}", sigmoid._finish_kernel, [x, "*fp64", "*fp64", "i32", "i64", "i64"], steps | layout),
            (f"sigmoid spread write {dtype}", sigmoid._write_pass, [x, "*fp64", "*fp64", "*fp64", x, "i32", "i64", "i64"], layout),
        ]
    for dtype, compute in (("fp32", tl.float32), ("bf16", tl.float32), ("fp64", tl.float64)):
        out.append((f"sigmoid backward sums {dtype}", sigmoid._backward_sums, ["*" + dtype, "*" + dtype, "*fp64", "*fp64", "i32"], dict(BLOCK=4096, DT=compute)))
        for sums in (True, False):
            ce = dict(BLOCK=4096, SUMS=sums, DT=compute)
            types = ["*" + dtype, "*" + dtype, "*fp64", "*fp64", "*" + dtype, "*" + ("fp64" if dtype == "fp64" else "fp32"), "i32"]
            out.append((f"sigmoid backward write {dtype} sums={sums}", sigmoid._backward_write, types, ce))
    for dtype in ("fp32", "bf16"):
        ce = dict(K=8, KP=8, BLOCK=128, SOFTMAX=True, RENORMALIZE=True)
        out.append((f"router {dtype}", router._router_kernel, ["*" + dtype, "*" + dtype, "*i64", "*i64", "i32", "i64", "i64"], ce))
    return out


def compile_all(names: list[str] | None = None, target: GPUTarget = TARGET) -> tuple[int, list[str]]:
    """Build the variants (those whose name is in ``names``, default all) for ``target``;
    return how many were built and the failures, one line each."""
    failures = []
    chosen = [v for v in variants() if names is None or v[0] in names]
    if names is not None and len(chosen) != len(names):
        raise ValueError(f"names={names!r} holds names that are not variants")
    for name, kernel, types, constexprs in chosen:
        names = [a for a in kernel.arg_names if a not in constexprs]
        signature = dict(zip(names, types)) | {a: "constexpr" for a in constexprs}
        source = ASTSource(kernel, signature, {(kernel.arg_names.index(a),): v for a, v in constexprs.items()})
        try:
            triton.compile(source, target=target, options={"num_warps": 4})
        except Exception as error:  # report every kernel, not just the first failure
            failures.append(f"{name}: {type(error).__name__}: {str(error).strip().splitlines()[-1]}")
    return len(chosen), failures


if __name__ == "__main__":  # python -m khot._triton.check ["variant name" ...]
    built, failures = compile_all(sys.argv[1:] or None)
    print("\n".join(failures) or f"{built} kernel variants compile for {TARGET}")
    sys.exit(1 if failures else 0)
