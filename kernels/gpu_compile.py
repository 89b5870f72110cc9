"""Compile every Triton kernel variant for a real GPU target, without a GPU.

The interpreter accepts code that the compiler rejects (and the reverse), so CI
also lowers each kernel to a cubin for ``sm_90``. Each kernel module lists its
variants in ``GPU_COMPILE_CASES`` as ``(name, jit_function, signature, constexprs)``, with
compile options (``num_warps``, as the launcher passes them) as an optional fifth item.

Each variant is compiled afresh and ``ptxas``'s report gives its registers and spill
stores: a float32 or bfloat16 variant must not spill (float64 and float16 spills are
reported).

Run: ``python -m kpfast.kernels.gpu_compile [arch]`` (must not run with
``TRITON_INTERPRET=1``, which replaces the compiler).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import sys

KERNEL_MODULES = ("edge_map", "soft_argmax", "umeyama")


def cases():
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"kpfast.kernels.{name}")
        yield from module.GPU_COMPILE_CASES


def compile_case(fn, signature, constexprs, arch: int = 90, options: dict | None = None):
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptxas_usage(log: str) -> tuple[int, int]:
    """(registers, spill-store bytes) from ``ptxas -v``'s report of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    if not regs or not spills:
        raise ValueError(f"no register report in the ptxas log: {log!r}")
    return int(regs.group(1)), int(spills.group(1))


def main(argv=None) -> int:
    import triton

    argv = sys.argv[1:] if argv is None else argv
    arch = int(argv[0]) if argv else 90
    triton.knobs.compilation.always_compile = True  # a cached kernel has no ptxas report
    triton.knobs.nvidia.dump_ptxas_log = True  # printed to stdout during compile
    failed = 0
    for label, fn, signature, constexprs, *options in cases():
        try:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                k = compile_case(fn, signature, constexprs, arch, *options)
            regs, spills = ptxas_usage(log.getvalue())
            usage = (f"{len(k.asm['cubin'])} B cubin, {k.metadata.shared} B shared memory, {regs} registers, "
                     f"{spills} B spill stores")
            if spills and not {"*fp64", "*fp16"} & set(signature.values()):
                failed += 1
                print(f"FAIL  sm_{arch} {label}: spills registers ({usage})")
            else:
                print(f"ok    sm_{arch} {label}: {usage}")
        except Exception as err:  # report every failure, then fail
            failed += 1
            print(f"FAIL  sm_{arch} {label}: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
