"""Command line of ``python -m kpfast.train`` (and ``torchrun ... -m kpfast.train``).

Examples::

    python -m kpfast.train --preset demo --out runs/demo
    python -m kpfast.train --preset demo --method supervised --out runs/demo-supervised
    python -m kpfast.train --preset paper --dataset wflw:/data/WFLW --shots 10 --out runs/wflw10
    python -m kpfast.train --preset paper --without geo3d --without kmeans --out runs/ablation
    python -m kpfast.train --preset demo --out runs/demo --resume        # continue an interrupted run
    python -m kpfast.train --preset demo --set lr=3e-4 --set unet_widths=16,32,64 --out runs/x
    python -m kpfast.train --preset demo --method supervised --out runs/demo --overwrite   # replace that run

--preset is required: a run states its scale (demo: minutes on a CPU; paper: the
paper's 20k iterations at 128 px, for a GPU; tiny: seconds, a smoke test). Before
training, the run prints its plan (preset, method, steps, image size, device) and,
after its first steps, an estimate of the time it will take.

An OUT folder holding another run is refused unless --overwrite (which deletes that
run's files first) or --resume (same config: continues it).

Exit status: 0 on success, 1 when a loss, gradient or weight became non-finite (the
message names the term or setting and the step), 2 on a bad configuration, a
refused run folder or an unreadable checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from ..config import ABLATIONS, METHODS, OPS, PRESETS, RUN_FIELDS, TrainConfig
from ..methods import METHODS as METHOD_REGISTRY

# fields with an option of their own that --set would be silently overridden by
OWN_OPTION_FIELDS = {"preset": "--preset", "out": "--out", "resume": "--resume", "overwrite": "--overwrite"}
PRESET_USES = {"demo": "the README's main job, minutes on a CPU", "paper": "the paper's settings, for a GPU",
               "tiny": "seconds, a smoke test"}

# options that map one to one onto TrainConfig fields
FIELD_OPTIONS = {
    "dataset": "built-in category (face, animal, car) or path to real data (FORMAT:PATH to name the format)",
    "test_dataset": "real data: a separate test set (path or FORMAT:PATH); default: the dataset's own test split, "
                    "or a fixed 20%% of its images chosen by path hash when it has none",
    "category": "COCO-format data: the categories to read, comma-separated (default: all with the file's keypoints)",
    "shots": "number of labelled images",
    "method": f"one of {', '.join(METHODS)}",
    "source": "--method adaptation: the core detector's source: a dataset to train it on with all its labels "
              "(face, animal, car or a real-format path) or a kpfast run folder / model.pt of a trained detector",
    "ops": "fused kernels or the plain-PyTorch reference",
    "iterations": "training steps",
    "image_size": "side of the square images",
    "train_size": "training images (procedural split size / cap on real data)",
    "test_size": "test images",
    "batch_unlabeled": "unlabelled images per step and process",
    "batch_labeled": "labelled images per step (default min(16, shots))",
    "lr": "Adam learning rate",
    "perceptual": "perceptual backbone: imagenet, none, or a local checkpoint path",
    "few_shot_features": "features for the k-means few-shot selection: auto, imagenet, handcrafted or a path",
    "seed": "random seed",
    "device": "auto, cpu, cuda or cuda:N",
    "cache_dir": "where generated datasets are cached",
    "checkpoint_every": "steps between checkpoints",
    "log_every": "steps between CSV/TensorBoard rows",
    "image_every": "steps between PNG snapshots (0: only at the end)",
}


def _field_types() -> dict:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _parse_value(name: str, text: str):
    """Turn ``--set name=text`` into the field's type (``ValueError`` naming the field if it does not parse)."""
    try:
        return _parse_typed(name, text)
    except ValueError as e:
        raise ValueError(f"--set {name}={text}: {e}") from None


def _parse_typed(name: str, text: str):
    t = _field_types()[name]
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union and type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        t = next(a for a in args if a is not type(None))
    if t is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if t is tuple:
        items = [s for s in text.split(",") if s]
        current = getattr(TrainConfig, name, ())
        kind = type(current[0]) if current else str
        return tuple(_convert(kind, s) for s in items)
    return _convert(t, text)


def _convert(kind: type, text: str):
    try:
        return kind(text)
    except ValueError:
        expected = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise ValueError(f"expected {expected}, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kpfast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="required, the starting point (other options override it): " + _presets_text())
    p.add_argument("--out", required=True, help="run directory: metrics.json, checkpoints, logs, PNGs")
    p.add_argument("--overwrite", action="store_true",
                   help="OUT holds another run: delete its files and train this one")
    p.add_argument("--without", action="append", default=[], choices=ABLATIONS,
                   help="switch a component off (repeatable): " + ", ".join(ABLATIONS))
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt bit for bit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="set any TrainConfig field (tuples comma-separated), e.g. --set w_geo3d=0.2")
    types = _field_types()
    for name, help_ in FIELD_OPTIONS.items():
        kw = {"choices": METHODS} if name == "method" else {"choices": OPS} if name == "ops" else {}
        t = types[name]
        base = next((a for a in typing.get_args(t) if a is not type(None)), t)
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=base, default=None, help=help_, **kw)
    return p


def _presets_text() -> str:
    def scale(name):
        cfg = TrainConfig.from_preset(name)
        return f"{cfg.iterations} steps at {cfg.image_size} px"

    return "; ".join(f"{name}: {scale(name)} ({PRESET_USES[name]})" for name in sorted(PRESETS))


def parse_settings(items) -> dict:
    """``["lr=3e-4", "unet_widths=16,32"]`` (``--set`` values) -> typed TrainConfig overrides."""
    overrides = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in _field_types():
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{sorted(_field_types())}")
        if name in OWN_OPTION_FIELDS:
            raise ValueError(f"--set {item}: use {OWN_OPTION_FIELDS[name]} to set {name}")
        overrides[name] = _parse_value(name, value)
    return overrides


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` the parsed command line describes."""
    if args.preset is None:
        raise ValueError(f"--preset is required, it sets the scale of the run: {_presets_text()}")
    overrides = {name: getattr(args, name) for name in FIELD_OPTIONS if getattr(args, name) is not None}
    overrides.update(parse_settings(args.set))
    if args.without:
        overrides["without"] = tuple(args.without)
    overrides["out"] = args.out
    overrides["resume"] = args.resume
    overrides["overwrite"] = args.overwrite
    if args.no_progress:
        overrides["progress"] = False
    return TrainConfig.from_preset(args.preset, **overrides)


def argv_for(config: dict) -> list[str]:
    """The ``python -m kpfast.train`` arguments that reproduce a run from its config dict (as in
    ``metrics.json``): its preset plus the fields that differ from it, and ``--out``; run-only
    fields (progress, logging, devices, ...) are left out.

    Example:
        >>> argv_for(TrainConfig.from_preset("demo", seed=3, out="runs/x").to_dict())
        ['--preset', 'demo', '--seed', '3', '--out', 'runs/x']
    """
    preset = config.get("preset") or "paper"
    # the preset with the run's method's own values at it (kpfast.methods.Method.presets), which then go unsaid
    # (read from the registry, not by building that method's config: a method may need fields the preset lacks)
    own = METHOD_REGISTRY[config["method"]].presets.get(preset, {}) if config.get("method") in METHOD_REGISTRY else {}
    base = {**TrainConfig.from_preset(preset).to_dict(),
            **{k: list(v) if isinstance(v, tuple) else v for k, v in own.items()}}
    args = ["--preset", preset]
    for name, value in config.items():
        if name in RUN_FIELDS or base.get(name) == value:
            continue
        if name == "without":
            for w in value:
                args += ["--without", w]
        elif name in FIELD_OPTIONS:
            args += [f"--{name.replace('_', '-')}", str(value)]
        else:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            args += ["--set", f"{name}={text}"]
    return args + ["--out", str(config["out"])]


def command_line(config: dict) -> str:
    """:func:`argv_for` as one line, with ``--out`` kept to the run folder's name under ``runs/``.

    Example:
        >>> cfg = TrainConfig.from_preset("demo", method="supervised", out="/tmp/x/sup", progress=False)
        >>> command_line(cfg.to_dict())
        'python -m kpfast.train --preset demo --method supervised --out runs/sup'
    """
    from pathlib import Path

    args = argv_for({**config, "out": f"runs/{Path(config['out']).name}"})
    return "python -m kpfast.train " + " ".join(args)


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        p.error(str(e))
    from ..safe_load import LoadError
    from .loop import NonFiniteLossError, trainer_class
    from .run_folder import RunFolderError

    try:
        trainer_class(cfg)(cfg).run()
    except NonFiniteLossError as e:
        print(f"kpfast train: {e}", file=sys.stderr)
        return 1
    except (RunFolderError, LoadError) as e:
        print(f"kpfast train: {e}", file=sys.stderr)
        return 2
    return 0


def reexec_with_passive_openmp() -> None:
    """Re-run this command with ``OMP_WAIT_POLICY=PASSIVE`` on CPU-only machines.

    OpenMP's default busy-waiting makes a 2-thread CPU run up to 10x slower as soon as
    any other process competes for the cores (measured on the 2-core development
    machine: 1.8 s instead of 0.11 s for a detector step); passive waiting removes
    that cliff at a small cost. The policy is read when the OpenMP runtime loads,
    i.e. when torch is imported, which has happened by the time this runs, hence the
    ``exec``. Skipped when the variable is already set, when ``KPFAST_NO_REEXEC`` is
    set, or when CUDA is available.
    """
    import os

    import torch

    if os.environ.get("OMP_WAIT_POLICY") or os.environ.get("KPFAST_NO_REEXEC") or torch.cuda.is_available():
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["KPFAST_NO_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "kpfast.train", *sys.argv[1:]])
