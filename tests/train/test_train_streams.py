"""Independent random streams: switching a term off changes only what that term draws."""

import pytest
import torch

from kpfast.data import transforms as transforms_module
from kpfast.models import masking
from kpfast.losses import part_geometry
from kpfast.train import TrainConfig, Trainer
from kpfast.train.streams import RandomStreams, stream_seed


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kpfast-cache"))


def _draws(cache, monkeypatch, steps=3, **kw):
    """Train ``steps`` steps of the tiny preset and record every random draw by kind."""
    seen = {"transforms": [], "masks": [], "partners": []}
    sample, mask, partners = (transforms_module.sample_transform, masking.patch_mask, part_geometry.choose_partners)

    def rec_sample(*a, **k):
        t = sample(*a, **k)
        seen["transforms"].append(torch.cat([t.matrix.flatten(1), t.offset, t.hue[:, None]], 1))
        return t

    def rec_mask(*a, **k):
        out = mask(*a, **k)
        seen["masks"].append(out[1])
        return out

    def rec_partners(*a, **k):
        c = partners(*a, **k)
        seen["partners"].append(c)
        return c

    import kpfast.train.objective as objective
    monkeypatch.setattr(objective, "sample_transform", rec_sample)
    monkeypatch.setattr(objective, "patch_mask", rec_mask)
    monkeypatch.setattr(part_geometry, "choose_partners", rec_partners)
    cfg = TrainConfig.from_preset("tiny", cache_dir=cache, out=None, iterations=steps,
                                  random_partner_iterations=steps, **kw)
    trainer = Trainer(cfg)
    init = {k: v.clone() for k, v in trainer.model.detector.state_dict().items()}
    for s in range(steps):
        trainer.train_step(s)
    monkeypatch.undo()
    return seen, init, trainer.data.labeled


@pytest.mark.parametrize("without", [("recon",), ("geo2d",), ("geo3d",), ("uncertainty",)])
def test_an_ablation_changes_only_the_draws_of_the_term_it_removes(cache, monkeypatch, without):
    full, init_full, labeled_full = _draws(cache, monkeypatch)
    ablated, init_ablated, labeled_ablated = _draws(cache, monkeypatch, without=without)
    removed = {"recon": "masks", "geo2d": "transforms", "geo3d": "partners"}.get(without[0])
    for kind, draws in full.items():
        if kind == removed:
            assert ablated[kind] == [], f"--without {without[0]} still draws {kind}"
            continue
        assert len(draws) == len(ablated[kind]) == 3, kind
        for a, b in zip(draws, ablated[kind]):
            assert torch.equal(a, b), f"--without {without[0]} changed the {kind}"
    assert labeled_full == labeled_ablated, "the few-shot selection changed"
    for k in init_full:
        assert torch.equal(init_full[k], init_ablated[k]), f"initial detector weight {k} changed"


def test_supervised_and_autolink_start_from_the_same_detector_and_labels(cache, monkeypatch):
    _, init_full, labeled_full = _draws(cache, monkeypatch, steps=1)
    for method in ("supervised", "autolink-few"):
        _, init, labeled = _draws(cache, monkeypatch, steps=1, method=method)
        assert labeled == labeled_full, method
        assert all(torch.equal(init_full[k], init[k]) for k in init_full), method


def test_streams_are_distinct_per_name_seed_and_rank():
    seeds = {stream_seed(s, n, r) for s in (0, 1) for n in ("masks", "transforms", "init") for r in (0, 1)}
    assert len(seeds) == 12
    a = RandomStreams(3)
    b = RandomStreams(3)
    torch.rand(5, generator=a["partners"])
    b.load_state_dict(a.state_dict())
    assert torch.equal(torch.rand(4, generator=a["partners"]), torch.rand(4, generator=b["partners"]))
