"""The networks of the method: keypoint detector, reconstruction UNet, perceptual loss.

- :class:`KeypointDetector`: ResNet with upsampling, 3K maps -> keypoints,
  uncertainty, depth (:class:`Detections`);
- :class:`ReconstructionUNet` and :func:`patch_mask`: edge map + masked image -> image;
- :class:`FewShotKeypointModel`: all trained networks behind one ``forward``;
- :class:`PerceptualLoss`, :func:`build_perceptual_loss`: the pluggable perceptual term.

The edge map is :class:`kpfast.nn.EdgeMap`.
"""

from .detector import Detections, KeypointDetector
from .keypoint_model import FewShotKeypointModel
from .masking import patch_mask, patch_size_for
from .perceptual import PerceptualLoss, build_perceptual_loss, load_feature_module
from .unet import ReconstructionUNet

__all__ = ["Detections", "KeypointDetector", "FewShotKeypointModel", "ReconstructionUNet", "patch_mask",
           "patch_size_for", "PerceptualLoss", "build_perceptual_loss", "load_feature_module"]
