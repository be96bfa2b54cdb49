"""colld: Contrastive Layer-to-Layer Distillation of speech encoders."""

__version__ = "0.1.0"
