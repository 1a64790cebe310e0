"""thalweg: PyTorch optimizers — a drop-in for torch.optim, plus LARS and LAMB, with fast fused steps.

    optimizer = thalweg.Adam(model.parameters(), lr=1e-3)      # exactly torch.optim.Adam
    optimizer = thalweg.create("lamb", model, lr=2e-3)         # by name, no-decay group built for you
"""

from . import schedules
from ._base import Optimizer
from .factory import create, names
from .optim import LAMB, LARS, SGD, Adagrad, Adam, AdamW, Momentum, RMSprop

__version__ = "0.1.0"
__all__ = ["SGD", "Momentum", "Adam", "AdamW", "RMSprop", "Adagrad", "LARS", "LAMB", "Optimizer", "create", "names", "schedules"]
