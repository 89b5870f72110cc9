"""The fused ops, one module each: validation, custom-op registration, autograd, dispatch."""

from .edge_map import edge_map
from .soft_argmax import soft_argmax
from .umeyama import part_alignment, umeyama

__all__ = ["edge_map", "soft_argmax", "umeyama", "part_alignment"]
