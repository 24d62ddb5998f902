"""Model classes the engine instantiates from configs held in the repo."""

from .stage_a import PaellaVQModel
from .unet import CascadeUNet

__all__ = ["CascadeUNet", "PaellaVQModel"]
