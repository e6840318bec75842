"""The paper's networks as plain ``nn.Module`` s (no Lightning, no Hydra)."""

from phs.nets.discriminator import PatchDiscriminator
from phs.nets.resnet import ResnetGenerator
from phs.nets.unet import Segmentor

__all__ = ["PatchDiscriminator", "ResnetGenerator", "Segmentor"]
