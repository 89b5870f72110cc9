"""Compile every Triton kernel variant for a real GPU target, without a GPU.

The interpreter accepts code that the compiler rejects (and the reverse), so CI
also lowers each kernel to a cubin for ``sm_90``. Each kernel module lists its
variants in ``GPU_COMPILE_CASES`` as ``(name, jit_function, signature, constexprs)``, with
compile options (``num_warps``, as the launcher passes them) as an optional fifth item.

Run: ``python -m kpfast.kernels.gpu_compile [arch]`` (must not run with
``TRITON_INTERPRET=1``, which replaces the compiler).
"""

from __future__ import annotations

import importlib
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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    arch = int(argv[0]) if argv else 90
    failed = 0
    for label, fn, signature, constexprs, *options in cases():
        try:
            k = compile_case(fn, signature, constexprs, arch, *options)
            print(f"ok    sm_{arch} {label}: {len(k.asm['cubin'])} B cubin, {k.metadata.shared} B shared memory")
        except Exception as err:  # report every failure, then fail
            failed += 1
            print(f"FAIL  sm_{arch} {label}: {type(err).__name__}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
