"""Readers of real keypoint datasets (added in a later step)."""


def open_format(path, fmt=None, *, split="train", image_size=128, size=None):
    raise NotImplementedError("real dataset formats are not implemented yet")
