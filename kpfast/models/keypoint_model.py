"""Everything that is trained, in one module: detector, edge map and reconstruction UNet.

One ``forward`` runs all the networks a training step needs, so that the module
can be wrapped in ``DistributedDataParallel`` as it is (DDP expects one forward
per backward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.skeletons import all_pairs
from .detector import Detections, KeypointDetector
from .edge_map import EdgeMap
from .unet import ReconstructionUNet

GRAPHS = ("skeleton", "all-pairs")


@dataclass
class ModelOutputs:
    """What :class:`FewShotKeypointModel` computes for a batch of ``B`` images of side ``S``.

    Attributes:
        detections: the :class:`Detections` on the images.
        detections_transformed: the :class:`Detections` on the transformed images (or None).
        edge_map: ``[B, 1, S, S]`` the edge map of ``detections`` (or None).
        reconstruction: ``[B, 3, S, S]`` the UNet's image from the edge map and ``masked`` (or None).
        masked: ``[B, 3, S, S]`` the patch-masked images the UNet saw (or None).
    """

    detections: Detections
    detections_transformed: Optional[Detections] = None
    edge_map: Optional[Tensor] = None
    reconstruction: Optional[Tensor] = None
    masked: Optional[Tensor] = None


class FewShotKeypointModel(nn.Module):
    """Detector + edge map + (optional) reconstruction UNet.

    Args:
        num_keypoints: ``K``.
        edges: the user's skeleton ``[(i, j), ...]`` (used with ``graph="skeleton"``).
        image_size: side ``S`` of the (square) input images.
        graph: ``"skeleton"`` (the paper: the user's edges, one shared weight
            ``alpha``) or ``"all-pairs"`` (AutoLink: every pair, one learned weight each).
        reconstruction: build the UNet (False for the supervised baseline and
            ``--without recon``).
        detector_widths, detector_up_widths, unet_widths, norm, depth_scale: see
            :class:`KeypointDetector` and :class:`ReconstructionUNet`.

    Example:
        >>> m = FewShotKeypointModel(3, [(0, 1), (1, 2)], 32, detector_widths=(8, 16),
        ...                          detector_up_widths=(8,), unet_widths=(8, 16))
        >>> out = m(torch.rand(2, 3, 32, 32), masked=torch.rand(2, 3, 32, 32))
        >>> out.detections.keypoints.shape, out.edge_map.shape, out.reconstruction.shape
        (torch.Size([2, 3, 2]), torch.Size([2, 1, 32, 32]), torch.Size([2, 3, 32, 32]))
    """

    def __init__(self, num_keypoints: int, edges: Sequence[tuple[int, int]], image_size: int, *,
                 graph: str = "skeleton", reconstruction: bool = True,
                 detector_widths: Sequence[int] = (64, 128, 256, 512), detector_up_widths: Sequence[int] = (256, 256),
                 unet_widths: Sequence[int] = (32, 64, 128, 256), norm: str = "batch", depth_scale: float = 20.0):
        super().__init__()
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
        self.image_size = int(image_size)
        self.graph = graph
        self.detector = KeypointDetector(num_keypoints, widths=detector_widths, up_widths=detector_up_widths,
                                         norm=norm, depth_scale=depth_scale)
        self.edge_map: Optional[EdgeMap] = None
        self.unet: Optional[ReconstructionUNet] = None
        if reconstruction:
            if graph == "all-pairs":
                self.edge_map = EdgeMap(all_pairs(num_keypoints), self.image_size, learn_edge_weights=True,
                                        edge_weight_noise=0.1)
            else:
                if not edges:
                    raise ValueError("the reconstruction needs a skeleton: the dataset's meta has no edges "
                                     "(use --without recon, or --method autolink-few for the all-pairs graph)")
                self.edge_map = EdgeMap(edges, self.image_size)
            self.unet = ReconstructionUNet(unet_widths, norm=norm)

    def forward(self, images: Tensor, *, transformed: Optional[Tensor] = None, masked: Optional[Tensor] = None,
                use_uncertainty: bool = True) -> ModelOutputs:
        """Run the networks one training step needs.

        Args:
            images: ``[B, 3, S, S]`` in ``[0, 1]``.
            transformed: ``[B', 3, S, S]`` transformed images for the equivariance loss;
                detected in the same detector call as ``images``.
            masked: ``[B, 3, S, S]`` patch-masked ``images``; given, the edge map of
                the detections on ``images`` and the UNet's reconstruction are returned.
            use_uncertainty: feed the uncertainty readout to the edge map.

        Returns:
            :class:`ModelOutputs` (edge map and reconstruction when ``masked`` is given).
        """
        B = images.shape[0]
        batch = images if transformed is None else torch.cat([images, transformed])
        det = self.detector(batch)
        own, other = det, None
        if transformed is not None:
            own = Detections(*(getattr(det, f)[:B] for f in Detections.__dataclass_fields__))
            other = Detections(*(getattr(det, f)[B:] for f in Detections.__dataclass_fields__))
        out = ModelOutputs(detections=own, detections_transformed=other, masked=masked)
        if masked is not None:
            if self.unet is None:
                raise ValueError("this model was built without the reconstruction UNet")
            unc = own.uncertainty if use_uncertainty and self.graph == "skeleton" else None
            out.edge_map = self.edge_map(own.keypoints, unc).unsqueeze(1)
            out.reconstruction = self.unet(torch.cat([out.edge_map, masked], 1))
        return out
