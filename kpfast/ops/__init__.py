"""The fused ops, one module each: validation, custom-op registration, autograd, dispatch."""

from .edge_map import edge_map

__all__ = ["edge_map"]
