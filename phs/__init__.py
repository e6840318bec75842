"""phs: pseudo-healthy synthesis of brain MRI with pathology factorization."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# ${phs.if:COND,A,B} in the configs: A when COND is true, else B (e.g. G's input channels)
OmegaConf.register_new_resolver("phs.if", lambda cond, a, b: a if cond else b, replace=True)
