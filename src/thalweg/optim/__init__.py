"""The optimizers, one module each."""

from .adam import Adam, AdamW

__all__ = ["Adam", "AdamW"]
