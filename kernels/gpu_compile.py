"""Compile every Triton kernel variant for a real GPU target, without a GPU.

The interpreter accepts code that the compiler rejects (and the reverse), so CI
also lowers each kernel to a cubin for ``sm_90``. Each kernel module lists its
variants in ``GPU_COMPILE_CASES`` as ``(name, jit_function, signature, constexprs)``, optionally
with a fifth item, the compile options a launch uses (``{"num_warps": 2}``).
Each line reports the registers and the stack frame of the cubin (``cuobjdump
--dump-resource-usage``); a stack frame in a Triton kernel is spilled registers
(status ``spill``). With ``--no-spills`` a spill in a float32 or 16-bit variant
fails the run (float64 ones are reported).

Run: ``python -m kpfast.kernels.gpu_compile [arch] [--no-spills]`` (must not run
with ``TRITON_INTERPRET=1``, which replaces the compiler).
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tempfile

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


def resource_usage(cubin: bytes) -> dict[str, int] | None:
    """``{"REG": registers, "STACK": stack frame bytes, ...}`` of a cubin, or None without cuobjdump."""
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.remove(f.name)
    found = dict(re.findall(r"\b([A-Z]+):(\d+)", out))
    return {k: int(v) for k, v in found.items()} or None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    no_spills = "--no-spills" in argv
    numbers = [a for a in argv if a != "--no-spills"]
    arch = int(numbers[0]) if numbers else 90
    failed = 0
    for label, fn, signature, constexprs, *options in cases():
        try:
            k = compile_case(fn, signature, constexprs, arch, *options)
        except Exception as err:  # report every failure, then fail
            failed += 1
            print(f"FAIL  sm_{arch} {label}: {type(err).__name__}: {err}")
            continue
        usage = resource_usage(k.asm["cubin"])
        regs = f"{usage['REG']} registers, {usage['STACK']} B stack" if usage else "registers unknown (no cuobjdump)"
        spills = bool(usage and usage["STACK"])
        status = "FAIL " if spills and no_spills and "fp64" not in label else "spill" if spills else "ok   "
        failed += status == "FAIL "
        print(f"{status} sm_{arch} {label}: {len(k.asm['cubin'])} B cubin, {k.metadata.shared} B shared memory, {regs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
