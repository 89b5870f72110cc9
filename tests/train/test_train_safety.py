"""Runs that cannot be hijacked, poisoned or overwritten: safe loading, checkpoint integrity,
the NaN guard, run folders that know their run, config validation and the run's announcement."""

import json
import math
import os
import zipfile

import pytest
import torch

import kpfast
from kpfast.train import NonFiniteLossError, TrainConfig, Trainer
from kpfast import config as config_module
from kpfast.checkpoint import CheckpointError, content_digest, load_checkpoint, save_checkpoint_file
from kpfast.train.cli import config_from_args, main, parser
from kpfast.train.guard import TERM_SETTINGS
from kpfast.train.moskvyak_objective import TERMS as MOSKVYAK_TERMS
from kpfast.train.objective import TERMS
from kpfast.train.run_folder import (LOCK_NAME, RunFolderError, prepare_run_folder, read_record, run_files)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kpfast-cache"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    """A finished 2-step tiny run (full method), read-only for the tests."""
    out = tmp_path_factory.mktemp("finished")
    kpfast.train.run(tiny(cache, out, iterations=2))
    return out


def tiny(cache, out, **kw):
    return TrainConfig.from_preset("tiny", cache_dir=cache, out=str(out), **kw)


def _snapshot(folder):
    """Every file's bytes, but the lock a run takes on the folder."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and
            p.name != LOCK_NAME}


# -- 1. loading never runs code from the file ---------------------------------------------------------------

class _Payload:
    """Unpickling this runs ``exec``: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"with open({self.marker!r}, 'w') as f: f.write('ran')",)


def _craft(path, marker, finished_run):
    """A file that looks like a kpfast checkpoint (real keys and config) with a payload inside."""
    real = load_checkpoint(finished_run / "checkpoint.pt")
    torch.save({**real, "model": {"weight": _Payload(marker)}, "sha256": "0" * 64}, path)


def test_the_crafted_pickle_is_a_real_exploit(tmp_path, finished_run):
    marker = tmp_path / "marker"
    _craft(tmp_path / "evil.pt", marker, finished_run)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "ran", "the payload runs when unpickled: the tests below would see it"


def _entry_points(run, evil, cache, tmp_path):
    """Every way a file reaches torch.load: name -> call (raises, or returns an exit status)."""
    from PIL import Image

    from kpfast.losses import build_perceptual_loss
    from kpfast.models.features import imagenet_backbone, resolve_extractor
    from kpfast.predict import main as predict_main

    def predict_cli():
        (tmp_path / "images").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "x.png")
        return predict_main([str(run), str(tmp_path / "images"), "--out", str(tmp_path / "o")])

    def efficientnet_weights():
        pytest.importorskip("efficientnet_lite_pytorch")
        imagenet_backbone(weights=evil)

    return {
        "kpfast.load(file)": lambda: kpfast.load(evil),
        "kpfast.load(run dir)": lambda: kpfast.load(run),
        "python -m kpfast.predict": predict_cli,
        "python -m kpfast.train --resume": lambda: main(["--preset", "tiny", "--out", str(run), "--cache-dir", cache,
                                                          "--resume"]),
        "kpfast.train.run(resume=True)": lambda: kpfast.train.run(tiny(cache, run, resume=True)),
        "--perceptual PATH": lambda: build_perceptual_loss(str(evil)),
        "python -m kpfast.train --perceptual PATH": lambda: main(["--preset", "tiny", "--out", str(tmp_path / "r2"),
                                                                   "--cache-dir", cache, "--perceptual", str(evil)]),
        "few_shot_features=PATH": lambda: resolve_extractor(str(evil)),
        "imagenet_backbone(weights=PATH)": efficientnet_weights,
    }


ENTRY_POINTS = list(_entry_points(None, None, None, None))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_crafted_pickles_run_no_code_through_any_entry_point(entry, tmp_path, cache, finished_run, capsys):
    marker, run = tmp_path / "marker", tmp_path / "run"
    run.mkdir()
    evil = run / ("checkpoint.pt" if "resume" in entry else "model.pt")
    _craft(evil, marker, finished_run)
    call = _entry_points(run, evil, cache, tmp_path)[entry]
    try:
        status = call()
        message = capsys.readouterr().err
        assert status == 2, f"{entry}: exit status {status}"
    except (ValueError, OSError) as e:
        message = str(e)
    assert not marker.exists(), f"{entry} ran code from the file"
    assert f"{evil}: refused to load" in message and "'exec'" in message, message


def test_what_kpfast_writes_loads_as_plain_tensors(finished_run):
    for name in ("checkpoint.pt", "model.pt"):
        raw = torch.load(finished_run / name, weights_only=True)  # no allow-listed globals needed
        assert raw["format"] == "kpfast" and len(raw["sha256"]) == 64


# -- 4. checkpoint integrity -------------------------------------------------------------------------------

def _flip(path, offset, n=64):
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(b ^ 0xFF for b in data[offset:offset + n])
    path.write_bytes(bytes(data))


def _tensor_offset(path):
    """Where the largest tensor's bytes lie inside a torch.save zip (stored uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_flipped_bytes_in_tensor_data_are_detected(tmp_path, cache, finished_run):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "model.pt", "run.json"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    _flip(run / "checkpoint.pt", _tensor_offset(run / "checkpoint.pt"))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: damaged: its contents do not match the checksum"):
        load_checkpoint(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="checksum"):
        kpfast.train.run(tiny(cache, run, iterations=2, resume=True))
    _flip(run / "model.pt", _tensor_offset(run / "model.pt"))
    with pytest.raises(CheckpointError, match=r"model\.pt: damaged"):
        kpfast.load(run)


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) // 2], "cannot read this kpfast checkpoint: the file is truncated, damaged"),
    (lambda b: b[:100], "cannot read"),
    (lambda b: b"\0" * len(b), "cannot read"),
    (lambda b: b"", "cannot read"),
])
def test_damaged_files_give_errors_that_name_the_file(damage, message, tmp_path, finished_run):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(damage((finished_run / "checkpoint.pt").read_bytes()))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value)


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("optimizer"), r"a training checkpoint without \['optimizer'\]"),
    (lambda c: c.update(step=1_000_000), r"step 1000000 is outside \[0, 2\]"),
    (lambda c: c.update(step=-1), r"step -1 is outside"),
    (lambda c: c.update(kind="weights"), "unknown kind 'weights'"),
    (lambda c: c["config"].update(lr=float("inf")), "invalid config: TrainConfig: lr must be a finite number"),
    (lambda c: c.update(world_size=3), "world_size 3 does not match"),
    (lambda c: c.update(version=1), "older kpfast"),
])
def test_consistent_but_wrong_checkpoints_are_refused(change, message, tmp_path, finished_run):
    ckpt = load_checkpoint(finished_run / "checkpoint.pt")
    change(ckpt)
    save_checkpoint_file(ckpt, tmp_path / "checkpoint.pt")  # a valid checksum over the wrong content
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_file_without_its_checksum_is_refused(tmp_path, finished_run):
    ckpt = load_checkpoint(finished_run / "model.pt")
    torch.save(ckpt, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: no 'sha256' checksum"):
        kpfast.load(tmp_path / "model.pt")


def test_the_checksum_covers_every_value():
    base = {"a": torch.arange(4.0), "b": [1, 2.5, "x", None, True], "c": (torch.zeros(2, dtype=torch.bfloat16),)}
    variants = [{**base, "a": torch.arange(4.0).reshape(2, 2)}, {**base, "a": torch.arange(4.0).double()},
                {**base, "b": [1, 2.5, "x", None, 1]}, {**base, "b": (1, 2.5, "x", None, True)},
                {**base, "c": (torch.tensor([0.0, -0.0], dtype=torch.bfloat16),)}, {"b": base["b"], "a": base["a"],
                                                                                     "c": base["c"]}]
    digests = {content_digest(v) for v in variants}
    assert content_digest(base) not in digests and len(digests) == len(variants)


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path, cache):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".checkpoint.pt.k1l2m3.tmp", run / ".model.pt.abcdef.tmp"]
    for p in stale:
        p.write_bytes(b"half a checkpoint")
    (run / ".mine.tmp").write_text("a user's file")
    kpfast.train.run(tiny(cache, run, iterations=1))
    assert not any(p.exists() for p in stale)
    assert (run / ".mine.tmp").read_text() == "a user's file"


# -- 2. the NaN guard --------------------------------------------------------------------------------------

def test_a_nan_gradient_from_a_finite_loss_stops_before_the_step_naming_term_and_setting(tmp_path, cache,
                                                                                         monkeypatch):
    """The issue's ``depth_scale=0``: every loss term is finite, the 3D term's gradient is NaN."""
    monkeypatch.setitem(config_module.FLOAT_RANGES, "depth_scale", (0.0, math.inf, False))  # a setting not guarded
    cfg = tiny(cache, tmp_path, iterations=4, checkpoint_every=1, depth_scale=0.0)
    with pytest.raises(NonFiniteLossError, match=r"gradient of loss term 'geo3d' is not finite at step 1 .*"
                                                 r"depth_scale=0\.0.*no checkpoint was written yet"):
        kpfast.train.run(cfg)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_nan_parameter_never_reaches_a_checkpoint(tmp_path, cache, monkeypatch):
    original = Trainer.train_step

    def poison_after_step_3(self, step):
        scalars = original(self, step)
        if step == 2:
            with torch.no_grad():
                self.model.detector.head.bias[0] = float("nan")
        return scalars

    monkeypatch.setattr(Trainer, "train_step", poison_after_step_3)
    with pytest.raises(NonFiniteLossError, match=r"parameter 'detector\.head\.bias' is not finite after step 3, so "
                                                 r"checkpoint\.pt was not written.*last good checkpoint"):
        kpfast.train.run(tiny(cache, tmp_path, iterations=4, checkpoint_every=1))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_every_loss_term_names_its_settings():
    assert set(TERM_SETTINGS) == set(TERMS) | set(MOSKVYAK_TERMS)
    fields = set(TrainConfig.__dataclass_fields__)
    assert all(set(s) <= fields for s in TERM_SETTINGS.values())


# -- 3. run folders that know their run --------------------------------------------------------------------

def test_a_different_run_into_a_finished_runs_folder_is_refused(tmp_path, cache, finished_run):
    run = tmp_path / "run"
    run.mkdir()
    for p in run_files(finished_run):
        (run / p.relative_to(finished_run)).parent.mkdir(exist_ok=True)
        (run / p.relative_to(finished_run)).write_bytes(p.read_bytes())
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match=r"holds a finished run of a different config \(method: 'full' -> "
                                             r"'supervised'\); pass --overwrite"):
        kpfast.train.run(tiny(cache, run, iterations=2, method="supervised"))
    with pytest.raises(RunFolderError, match="holds a finished run of this config; pass --overwrite"):
        kpfast.train.run(tiny(cache, run, iterations=2))
    assert _snapshot(run) == before, "a refused run writes nothing"


def test_overwrite_replaces_the_old_run_entirely(tmp_path, cache):
    run = tmp_path / "run"
    kpfast.train.run(tiny(cache, run, iterations=2, image_every=1))
    (run / "notes.txt").write_text("the user's own file")
    kpfast.train.run(tiny(cache, run, iterations=2, method="supervised", overwrite=True))
    names = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert "edge_maps.png" not in names and "reconstructions.png" not in names, "no picture of the old run is left"
    assert not any(n.startswith("images") for n in names), "nor its snapshots"
    assert len(list((run / "tb").iterdir())) == 1, "one run's TensorBoard events"
    assert (run / "notes.txt").read_text() == "the user's own file"
    record = read_record(run)
    assert record["status"] == "finished" and record["config"]["method"] == "supervised"
    assert json.loads((run / "metrics.json").read_text())["method"] == "supervised"


def test_every_file_a_run_writes_is_known_to_the_run_folder(tmp_path, cache):
    run = tmp_path / "run"
    kpfast.train.run(tiny(cache, run, iterations=2, image_every=1))
    written = {p for p in run.rglob("*") if p.is_file()} - {run / LOCK_NAME}
    assert written == set(run_files(run)), "overwrite would leave files of the old run behind"


def test_resume_with_a_different_config_before_the_first_checkpoint_is_refused(tmp_path, cache, monkeypatch):
    original = Trainer.train_step

    def crash_at_step_2(self, step):
        if step == 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        kpfast.train.run(tiny(cache, tmp_path, iterations=4, checkpoint_every=4))
    monkeypatch.setattr(Trainer, "train_step", original)
    assert not (tmp_path / "checkpoint.pt").exists() and read_record(tmp_path)["status"] == "started"
    with pytest.raises(RunFolderError, match=r"started run of a different config \(lr: 0\.0001 -> 0\.0005\)"):
        kpfast.train.run(tiny(cache, tmp_path, iterations=4, checkpoint_every=4, lr=5e-4, resume=True))
    with pytest.raises(RunFolderError, match="pass --resume to continue it, --overwrite"):
        kpfast.train.run(tiny(cache, tmp_path, iterations=4, checkpoint_every=4))
    metrics = kpfast.train.run(tiny(cache, tmp_path, iterations=4, checkpoint_every=4, resume=True))
    assert metrics["resumed_from"] is None and len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 4


def test_a_folder_in_use_by_another_run_is_refused(tmp_path):
    cfg = TrainConfig.from_preset("tiny", out=str(tmp_path))
    first = prepare_run_folder(cfg)
    try:
        with pytest.raises(RunFolderError, match=f"another kpfast run is training into this folder \\(process "
                                                 f"{os.getpid()}\\)"):
            prepare_run_folder(cfg.replace(overwrite=True))
    finally:
        first.close()
    prepare_run_folder(cfg).close()  # released


def test_an_empty_out_is_rejected():
    with pytest.raises(ValueError, match="out must be a non-empty string"):
        TrainConfig.from_preset("tiny", out="")
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--out", ""])


# -- 5. configuration --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("w_geo3d", float("nan")), ("depth_scale", 0.0), ("lr", float("inf")), ("lr", 0.0), ("eval_batch", 0),
    ("detector_widths", (0, 0)), ("detector_widths", (-8, 16)), ("detector_widths", ()), ("unet_widths", (8,)),
    ("w_recon", -1.0), ("w_few_shot", float("-inf")), ("ramp_iterations", -1), ("random_partner_iterations", -1),
    ("shots", "abc"), ("shots", True), ("mask_ratio", 1.5), ("betas", (0.9, 1.0)), ("betas", (0.9,)),
    ("iterations", 2.5), ("seed", -1), ("data_seed", 2**40), ("dataset", ""), ("channels_last", "yes"),
    ("whole_object_weight", float("nan")), ("device", "cuda:x"), ("norm", "layer"),
])
def test_bad_values_are_rejected_field_by_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig: {field} must be"):
        TrainConfig.from_preset("tiny", **{field: value})


def test_every_number_field_has_a_range():
    import typing

    hints = typing.get_type_hints(TrainConfig)
    numeric = {name for name, t in hints.items() if int in (t, *typing.get_args(t)) or float in (t, *typing.get_args(t))}
    assert numeric == set(config_module.INT_RANGES) | set(config_module.FLOAT_RANGES)


def test_a_mutated_config_is_checked_again_before_training(tmp_path):
    cfg = TrainConfig.from_preset("tiny", out=str(tmp_path))
    cfg.lr = float("nan")
    with pytest.raises(ValueError, match="lr must be a finite number"):
        Trainer(cfg)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", [
    (["--set", "shots=abc"], "--set shots=abc: expected an integer, got 'abc'"),
    (["--set", "lr=abc"], "--set lr=abc: expected a number"),
    (["--set", "data_seed=abc"], "--set data_seed=abc"),
    (["--set", "detector_widths=8,x"], "--set detector_widths=8,x: expected an integer"),
    (["--set", "detector_widths=0,0"], "detector_widths must be a non-empty list of positive integers"),
    (["--set", "preset=demo"], "--set preset=demo: use --preset"),
    (["--set", "out=elsewhere"], "use --out"),
    (["--set", "eval_batch=0"], "eval_batch must be an integer >= 1"),
])
def test_cli_errors_name_the_field(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--preset", "tiny", "--out", "run", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_cli_needs_an_explicit_preset(capsys):
    with pytest.raises(ValueError, match=r"--preset is required.*paper: 20000 steps at 128 px"):
        config_from_args(parser().parse_args(["--out", "run"]))
    with pytest.raises(SystemExit):
        main(["--out", "run"])
    assert "--preset is required" in capsys.readouterr().err


def test_a_run_says_what_it_will_do_and_how_long_it_takes(tmp_path, cache, capsys):
    kpfast.train.run(tiny(cache, tmp_path, iterations=6))
    out = capsys.readouterr().out
    plan = out.splitlines()[0]
    assert plan.startswith("kpfast train: preset tiny, method full on face (4 shots): 6 steps at 32x32 px"), plan
    assert str(tmp_path) in plan
    assert "s per step (steps 2-4): about" in out and "for the remaining 2 steps" in out
