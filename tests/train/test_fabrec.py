"""--method 3fabrec: its losses' properties, its networks, its stages (what each trains), resume
across the stages, the reusable stage-1 autoencoder, kpfast.load on its model.pt, its ablations."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import kpfast
from kpfast.checkpoint import CheckpointError, load_checkpoint
from kpfast.losses.fabrec import (contrast_structure, discriminator_loss, gaussian_heatmaps, generator_loss,
                                  heatmap_loss, pixel_l1_loss, structural_loss)
from kpfast.models.fabrec import FabRecDetector, TransferLayer
from kpfast.train import TrainConfig
from kpfast.train.fabrec import AUTOENCODER, FINETUNE, TRANSFER, FabRecTrainer, Schedule, load_autoencoder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kpfast-cache"))


def tiny(cache, out, **kw):
    return TrainConfig.from_preset("tiny", method="3fabrec", cache_dir=cache, out=None if out is None else str(out),
                                   **kw)


def _rows(out):
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _images(seed, shape=(2, 3, 24, 24)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


# -- losses ----------------------------------------------------------------------
def test_pixel_l1_counts_grey_levels_and_is_zero_only_on_the_image():
    x = _images(0)
    assert pixel_l1_loss(x, x).item() == 0.0
    assert pixel_l1_loss(x.clamp(max=1 - 3 / 255) + 3 / 255, x.clamp(max=1 - 3 / 255)).item() == pytest.approx(3.0)
    y = _images(1)
    assert pixel_l1_loss(x, y).item() == pixel_l1_loss(y, x).item() > 0


def test_structural_loss_ignores_brightness_but_not_structure():
    x = _images(2)
    assert structural_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert structural_loss(x + 0.3, x).item() == pytest.approx(0.0, abs=1e-6)  # L1 would see 76 grey levels
    assert structural_loss(1 - x, x).item() > 1.9  # inverted structure: c*s near -1 everywhere
    noisy = structural_loss(x + 0.2 * (_images(3) - 0.5), x).item()
    assert 0.0 < noisy < structural_loss(_images(4), x).item()  # a little noise costs less than another image
    cs = contrast_structure(_images(5), x)
    assert cs.shape == (2, 3, 24 - 10, 24 - 10) and cs.abs().max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="window"):
        structural_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))


def test_adversarial_losses_reward_the_side_that_wins():
    zero = torch.zeros(4)
    assert discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert generator_loss(zero).item() == pytest.approx(math.log(2))
    # the discriminator gains by raising real logits and lowering fakes; the generator by raising fakes
    assert discriminator_loss(zero + 3, zero - 3) < discriminator_loss(zero, zero) < discriminator_loss(zero - 3, zero + 3)
    assert generator_loss(zero + 3) < generator_loss(zero) < generator_loss(zero - 3)
    fake = torch.zeros(4, requires_grad=True)
    (g,) = torch.autograd.grad(generator_loss(fake), fake)
    assert (g < 0).all(), "the non-saturating loss pushes the fake logits up"


@pytest.mark.parametrize("side", [32, 64])  # the demo's and the paper's heatmaps
def test_target_heatmaps_peak_where_soft_argmax_reads_the_keypoint(side):
    g = torch.Generator().manual_seed(6)
    keypoints = torch.rand(3, 20, 2, generator=g) * 1.6 - 0.8
    cfg = TrainConfig()
    maps = gaussian_heatmaps(keypoints, side, cfg.fabrec_sigma * side)
    assert maps.shape == (3, 20, side, side) and maps.max() <= 1
    det = FabRecDetector(20, 32, z_dim=4, encoder_widths=(4,), generator_widths=(4, 4), beta=cfg.fabrec_beta)
    error = (det.read_keypoints(maps).keypoints - keypoints).abs().max() * (side - 1) / 2
    assert error < 0.1, f"the default soft-argmax reads target heatmaps {error:.3f} heatmap pixels off"


def test_the_read_out_follows_where_a_heatmap_peaks_not_how_high():
    g = torch.Generator().manual_seed(7)
    keypoints = torch.rand(2, 6, 2, generator=g) * 1.6 - 0.8
    maps = gaussian_heatmaps(keypoints, 32, 1.75) + 0.02 * torch.rand(2, 6, 32, 32, generator=g)
    det = FabRecDetector(6, 32, z_dim=4, encoder_widths=(4,), generator_widths=(4, 4))
    full, weak = det.read_keypoints(maps), det.read_keypoints(0.01 * maps)
    assert torch.allclose(full.keypoints, weak.keypoints, atol=1e-5), "a weak map reads the same place"
    assert (full.keypoints - keypoints).abs().max() < 0.02
    assert (torch.sigmoid(weak.uncertainty) < torch.sigmoid(full.uncertainty)).all(), "but with less confidence"


def test_heatmap_loss_only_counts_the_masked_maps():
    target = gaussian_heatmaps(torch.zeros(2, 3, 2), 8, 1.5)
    pred = target.clone()
    pred[:, 1] += 5.0  # a wrong map, masked out
    mask = torch.tensor([[True, False, True], [True, False, True]])
    assert heatmap_loss(pred, target, mask).item() == 0.0
    assert heatmap_loss(pred, target, torch.ones_like(mask)).item() == pytest.approx(25.0 / 3)
    assert heatmap_loss(pred, target, torch.zeros_like(mask)).item() == 0.0


# -- networks ----------------------------------------------------------------------
def test_transfer_layers_start_as_the_identity_so_heatmaps_read_the_generators_features():
    itl = TransferLayer(6)
    x = torch.rand(2, 6, 5, 5)
    assert torch.equal(itl(x), x)
    det = FabRecDetector(3, 32, z_dim=6, encoder_widths=(8, 16), generator_widths=(16, 8, 8, 4)).eval()
    assert len(det.itls) == 2
    z = torch.randn(2, 6)
    h = det.generator.start(z)
    for block in det.generator.blocks[:-1]:
        h = block(h)
    assert torch.allclose(det.heatmaps(z), det.head(h), atol=1e-6)
    assert det.heatmaps(z).shape == (2, 3, 16, 16)


# -- stages ----------------------------------------------------------------------
def test_the_schedule_splits_the_iterations_into_the_stages():
    cfg = TrainConfig.from_preset("tiny", method="3fabrec", iterations=7, fabrec_ae_iterations=3,
                                  fabrec_finetune_iterations=2)
    s = Schedule.from_config(cfg)
    assert [s.stage(i) for i in range(7)] == [AUTOENCODER] * 3 + [TRANSFER] * 2 + [FINETUNE] * 2
    s = Schedule.from_config(cfg.replace(without=("finetune",)))
    assert [s.stage(i) for i in range(7)] == [AUTOENCODER] * 3 + [TRANSFER] * 4
    with pytest.raises(ValueError, match="fabrec_ae_iterations"):
        cfg.replace(fabrec_ae_iterations=5)
    with pytest.raises(ValueError, match="image_size 32 must be divisible by 2\\*\\*6"):
        cfg.replace(fabrec_encoder_widths=(4,) * 6)


def test_presets_carry_the_methods_own_scale_and_the_command_line_leaves_it_unsaid():
    from kpfast.methods import METHODS
    from kpfast.train.cli import command_line, config_from_args, parser

    demo = TrainConfig.from_preset("demo", method="3fabrec", out="/x/run", fabrec_z_dim=32)
    assert demo.fabrec_ae_iterations == METHODS["3fabrec"].presets["demo"]["fabrec_ae_iterations"] < demo.iterations
    assert TrainConfig.from_preset("demo", method="3fabrec", fabrec_ae_iterations=5).fabrec_ae_iterations == 5
    assert TrainConfig.from_preset("demo").fabrec_ae_iterations == TrainConfig().fabrec_ae_iterations
    argv = command_line(demo.to_dict()).split()[3:]
    assert argv == ["--preset", "demo", "--method", "3fabrec", "--set", "fabrec_z_dim=32", "--out", "runs/run"]
    again = config_from_args(parser().parse_args(argv))
    assert again.replace(out=demo.out) == demo


@pytest.mark.parametrize("change,match", [
    ({"fabrec_sigma": 0.0}, "fabrec_sigma must be a finite number > 0"),
    ({"fabrec_augment": 1.5}, "fabrec_augment"),
    ({"fabrec_w_cs": float("nan")}, "fabrec_w_cs"),
    ({"fabrec_generator_widths": (8,)}, "fabrec_generator_widths must be a list of at least 2"),
    ({"fabrec_finetune_iterations": 2}, "leave at least one of the 4 iterations"),
    ({"batch_unlabeled": 0}, "batch_unlabeled must be at least 1"),
    ({"image_size": 8, "fabrec_encoder_widths": (4,), "fabrec_generator_widths": (4, 4),
      "fabrec_discriminator_widths": (4,), "detector_widths": (4,), "mask_grid": 4}, "11x11 window"),
])
def test_bad_3fabrec_settings_are_refused_naming_them(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_preset("tiny", method="3fabrec", **change)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_each_stage_trains_only_its_networks(cache, tmp_path):
    tr = FabRecTrainer(tiny(cache, None, iterations=6, fabrec_ae_iterations=2, fabrec_finetune_iterations=2))
    parts = {"encoder": tr.model.detector.encoder, "generator": tr.model.detector.generator,
             "itls": tr.model.detector.itls, "head": tr.model.detector.head,
             "discriminators": torch.nn.ModuleList(tr.model.discriminators)}
    trained = []
    for step in range(6):
        before = {name: _snapshot(m) for name, m in parts.items()}
        tr.step = step  # as Trainer.run counts
        tr.train_step(step)
        trained.append({name for name, m in parts.items() if _changed(before[name], m)})
    assert trained[:2] == [{"encoder", "generator", "discriminators"}] * 2
    assert trained[2:4] == [{"itls", "head"}] * 2, "the autoencoder (and its normalization statistics) is frozen"
    assert trained[4:] == [{"encoder", "itls", "head"}] * 2, "fine-tuning trains the encoder, not the generator"
    # the fine-tuned encoder keeps its normalization statistics (a few labelled images only)
    enc = _snapshot(parts["encoder"])
    tr.step = 5
    tr.train_step(5)
    assert not {k for k in _changed(enc, parts["encoder"]) if "running" in k}


@pytest.mark.parametrize("without,terms", [
    ((), {"rec", "cs", "enc", "adv", "disc_z", "disc_x"}),
    (("adv",), {"rec", "cs", "enc", "disc_z"}),
    (("struct",), {"rec", "enc", "adv", "disc_z", "disc_x"}),
])
def test_ablations_switch_their_terms_off(cache, tmp_path, without, terms):
    kpfast.train.run(tiny(cache, tmp_path, without=without))
    rows = _rows(tmp_path)
    logged = [{k for k, v in r.items() if v != ""} - {"step", "total", "stage", "lr"} for r in rows]
    assert logged[:2] == [terms] * 2
    assert logged[2:] == [{"heatmap"}] * 2
    assert [r["stage"] for r in rows] == ["1", "1", "2", "3"]


def test_without_finetune_stage_two_runs_to_the_end(cache, tmp_path):
    metrics = kpfast.train.run(tiny(cache, tmp_path, without=("finetune",)))
    assert [r["stage"] for r in _rows(tmp_path)] == ["1", "1", "2", "2"]
    assert metrics["without"] == ["finetune"]


def test_resume_is_bit_for_bit_across_every_stage(cache, tmp_path, monkeypatch):
    kw = dict(iterations=6, fabrec_ae_iterations=2, fabrec_finetune_iterations=2, checkpoint_every=1)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    kpfast.train.run(tiny(cache, straight, **kw))
    original = FabRecTrainer.train_step
    for crash_at, resume in ((1, False), (3, True), (4, True)):  # in stage 1, at stage 2's start, at stage 3's
        def crash(self, step, crash_at=crash_at):
            if step == crash_at:
                raise KeyboardInterrupt("simulated crash")
            return original(self, step)

        monkeypatch.setattr(FabRecTrainer, "train_step", crash)
        with pytest.raises(KeyboardInterrupt):
            kpfast.train.run(tiny(cache, interrupted, resume=resume, **kw))
        assert load_checkpoint(interrupted / "checkpoint.pt")["step"] == crash_at
    monkeypatch.setattr(FabRecTrainer, "train_step", original)
    metrics = kpfast.train.run(tiny(cache, interrupted, resume=True, **kw))
    assert metrics["resumed_from"] == 4

    a, b = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(interrupted / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"parameter {k} differs after resume"
    assert set(a["optimizer"]) == {"autoencoder", "discriminators", "transfer", "finetune"}
    for name in a["optimizer"]:
        for (ka, sa), (kb, sb) in zip(a["optimizer"][name]["state"].items(), b["optimizer"][name]["state"].items()):
            for key in sa:
                assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), f"optimizer {name} {ka}.{key}"
    for name, state in a["rng"][0]["streams"].items():
        assert torch.equal(state, b["rng"][0]["streams"][name]), f"random stream {name}"
    assert _rows(straight) == _rows(interrupted)
    ae_a, ae_b = load_checkpoint(straight / "autoencoder.pt"), load_checkpoint(interrupted / "autoencoder.pt")
    assert all(torch.equal(ae_a["model"][k], ae_b["model"][k]) for k in ae_a["model"])
    assert json.loads((straight / "metrics.json").read_text())["test"] == metrics["test"]


def test_a_reused_autoencoder_gives_the_model_of_a_run_that_trained_it(cache, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    kpfast.train.run(tiny(cache, first))
    ae = load_checkpoint(first / "autoencoder.pt")
    assert ae["kind"] == "autoencoder" and ae["step"] == 2
    assert {k.split(".")[0] for k in ae["model"]} == {"encoder", "generator"}
    metrics = kpfast.train.run(tiny(cache, second, fabrec_autoencoder=str(first)))
    assert [r["step"] for r in _rows(second)] == ["3", "4"], "stage 1 is skipped"
    assert not (second / "autoencoder.pt").exists()
    a, b = load_checkpoint(first / "model.pt")["model"], load_checkpoint(second / "model.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["test"]["nme"] == json.loads((first / "metrics.json").read_text())["test"]["nme"]


def test_an_autoencoder_that_does_not_fit_is_refused_naming_why(cache, tmp_path):
    kpfast.train.run(tiny(cache, tmp_path / "ae"))
    with pytest.raises(CheckpointError, match=r"fabrec_z_dim: 8 here 9"):
        load_autoencoder(tmp_path / "ae", tiny(cache, None, fabrec_z_dim=9))
    with pytest.raises(CheckpointError, match="not a 3fabrec autoencoder"):
        load_autoencoder(tmp_path / "ae" / "model.pt", tiny(cache, None))
    with pytest.raises(FileNotFoundError, match="fabrec_autoencoder"):
        load_autoencoder(tmp_path / "nothing", tiny(cache, None))
    with pytest.raises(CheckpointError, match="autoencoder"):
        kpfast.load(tmp_path / "ae" / "autoencoder.pt")


def test_kpfast_load_predicts_what_the_run_evaluated(cache, tmp_path):
    kpfast.train.run(tiny(cache, tmp_path))
    trainer = FabRecTrainer(tiny(cache, None))
    trainer.model.detector.load_state_dict(load_checkpoint(tmp_path / "model.pt")["model"])
    trainer.model.eval()
    images = torch.stack([trainer.data.test[i]["image"] for i in range(3)])
    predictor = kpfast.load(tmp_path / "model.pt")
    with torch.no_grad():
        expected = (trainer.detect(images) + 1) / 2 * (images.shape[-1] - 1)  # pixels, as predict gives them
    got = predictor.predict(images).keypoints
    assert got.shape == (3, trainer.meta.num_keypoints, 2)
    assert torch.allclose(got, expected, atol=1e-4)
    for name in ("reconstructions.png", "predictions.png"):
        assert (tmp_path / name).is_file()


RANK_SCRIPT = """
import sys, torch
from kpfast.train import TrainConfig
from kpfast.train.fabrec import FabRecTrainer
cfg = TrainConfig.from_preset("tiny", method="3fabrec", out=sys.argv[1], cache_dir=sys.argv[2], checkpoint_every=4)
trainer = FabRecTrainer(cfg)
trainer.run()
torch.save(trainer.model.state_dict(), f"{sys.argv[1]}/../rank{trainer.world.rank}.pt")
"""


def test_two_process_torchrun_keeps_the_ranks_in_step(tmp_path):
    from test_train_distributed import _free_port

    out, script = tmp_path / "run", tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KPFAST_NO_REEXEC": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(out), str(tmp_path / "cache")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and [r["stage"] for r in _rows(out)] == ["1", "1", "2", "3"]
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert not torch.equal(ckpt["rng"][0]["streams"]["prior"], ckpt["rng"][1]["streams"]["prior"])
    # different images and prior codes on each rank, one model: gradients and statistics were shared
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_the_committed_grid_runs_every_ablation_on_the_reported_seeds():
    from pathlib import Path

    from kpfast.experiments import Grid

    grid = Grid.load(Path(__file__).resolve().parents[2] / "docs" / "results" / "fabrec" / "grid.json")
    assert grid.seeds == [100, 101, 102] and grid.datasets == ["face", "animal"]
    arms = {(r.config.method, r.config.without) for r in grid.runs()}
    assert arms == {("3fabrec", ()), ("3fabrec", ("adv",)), ("3fabrec", ("struct",)), ("3fabrec", ("finetune",)),
                    ("supervised", ())}
