"""thalweg: PyTorch optimizers, a drop-in for torch.optim with LARS, LAMB and fast fused steps."""

from .optim import Adam, AdamW

__version__ = "0.1.0"
__all__ = ["Adam", "AdamW"]
