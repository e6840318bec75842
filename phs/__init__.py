"""phs: pseudo-healthy synthesis of brain MRI with pathology factorization."""

__version__ = "0.1.0"
