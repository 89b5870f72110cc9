"""The fused ops, one module per op (``<op>_op.py``: validation, the custom op, its autograd),
one selection point for the implementation (``backend.py``) and the C++ kernels behind the
interface of the Triton ones (``cpp_kernels.py``)."""

from .edge_map_op import edge_map
from .soft_argmax_op import soft_argmax
from .umeyama_op import part_alignment, umeyama

__all__ = ["edge_map", "soft_argmax", "umeyama", "part_alignment"]
