"""The networks of the method: keypoint detector, reconstruction UNet, image features.

- :class:`KeypointDetector`: ResNet with upsampling, 3K maps -> keypoints,
  uncertainty, depth (:class:`Detections`);
- :class:`EdgeMap`: :func:`kpfast.edge_map` with the paper's learned thickness and strength;
- :class:`ReconstructionUNet` and :func:`patch_mask`: edge map + masked image -> image;
- :class:`FewShotKeypointModel`: all trained networks behind one ``forward``, which
  returns :class:`ModelOutputs`;
- :mod:`kpfast.models.features`: the frozen ImageNet backbone (EfficientNet-Lite0) and the
  weight-free image descriptor, for the few-shot selection and the perceptual loss.

The perceptual loss is in :mod:`kpfast.losses`.
"""

from .detector import Detections, KeypointDetector
from .edge_map import EdgeMap
from .keypoint_model import FewShotKeypointModel, ModelOutputs
from .masking import patch_mask, patch_size_for
from .unet import ReconstructionUNet

__all__ = ["Detections", "KeypointDetector", "EdgeMap", "FewShotKeypointModel", "ModelOutputs", "ReconstructionUNet", "patch_mask",
           "patch_size_for"]
