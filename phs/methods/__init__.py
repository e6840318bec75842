"""One LightningModule per method (manual optimisation)."""

from phs.methods.base import PHSMethod
from phs.methods.baselines import ConditionalGAN, CycleGAN, PathologySegmentor
from phs.methods.proposed import ProposedPaired, ProposedUnpaired

__all__ = [
    "ConditionalGAN",
    "CycleGAN",
    "PHSMethod",
    "ProposedPaired",
    "ProposedUnpaired",
    "PathologySegmentor",
]
