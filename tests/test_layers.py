"""The package's shape: imports flow data -> models -> losses -> train, inference needs no training
code, ``import kpfast`` stays light, and no module is hidden behind a name that means something else."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import kpfast

PACKAGE = Path(kpfast.__file__).resolve().parent

FORBIDDEN = {
    # a module (or folder) of kpfast -> what it must never import, at any depth, even inside a function
    "data": ("models", "losses", "train", "evaluate", "inference", "predict", "viz", "diagnose", "experiments"),
    "models": ("losses", "train", "evaluate", "inference", "predict", "diagnose", "experiments"),
    "losses": ("train", "evaluate", "inference", "predict", "diagnose", "experiments"),
    "config": ("data", "models", "losses", "train"),
    "checkpoint": ("data", "models", "losses", "train"),
    "inference": ("train", "losses", "evaluate"),
    "predict": ("train", "losses", "evaluate"),
    "evaluate": ("models", "losses", "train"),
}


def _imported(path: Path, source: str = None) -> set[str]:
    """The kpfast modules a file imports anywhere in it (``"data.meta"``, ``"train"``, ...)."""
    package = path.relative_to(PACKAGE).parts[:-1]  # e.g. ("data",) for kpfast/data/few_shot.py
    out = set()
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name[len("kpfast."):] for a in node.names if a.name.startswith("kpfast.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module == "kpfast":
                out |= {a.name for a in node.names}
            elif node.module.startswith("kpfast."):
                out.add(node.module[len("kpfast."):])
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1]
            out |= {".".join((*base, node.module))} if node.module else {".".join((*base, a.name)) for a in node.names}
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_flow_one_way(layer):
    files = sorted((PACKAGE / layer).rglob("*.py")) if (PACKAGE / layer).is_dir() else [PACKAGE / f"{layer}.py"]
    assert files
    wrong = {f"{f.relative_to(PACKAGE)} imports kpfast.{name}" for f in files for name in _imported(f)
             if name.split(".")[0] in FORBIDDEN[layer]}
    assert not wrong, sorted(wrong)


def test_the_import_scanner_sees_relative_and_nested_imports():
    source = "from ..models import EdgeMap\nfrom . import meta\n\ndef f():\n    from kpfast.train import run\n"
    assert _imported(PACKAGE / "data" / "any.py", source) == {"models", "data.meta", "train"}


def test_import_kpfast_loads_only_the_ops():
    code = "import sys, kpfast; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    heavy = {m for m in loaded if m.startswith(("kpfast.train", "kpfast.data", "kpfast.models", "kpfast.losses",
                                                "kpfast.inference", "kpfast.evaluate", "tensorboard", "matplotlib",
                                                "torch.utils.tensorboard", "PIL"))}
    assert not heavy, sorted(heavy)
    assert callable(kpfast.load) and callable(kpfast.train.run), "both are there on first use"


def _all_modules() -> list[str]:
    names = ["kpfast"]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="kpfast."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return names


def test_no_module_is_shadowed_by_another_object():
    shadowed = []
    for name in _all_modules():
        module = importlib.import_module(name)
        parent, _, leaf = name.rpartition(".")
        if parent and getattr(importlib.import_module(parent), leaf) is not module:
            shadowed.append(f"{parent}.{leaf} is {type(getattr(importlib.import_module(parent), leaf)).__name__}")
        if type(module) is not type(kpfast):
            shadowed.append(f"{name} is a {type(module).__name__}, not a plain module")
    assert len(_all_modules()) > 40 and not shadowed, shadowed
