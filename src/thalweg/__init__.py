"""thalweg: PyTorch optimizers — a drop-in for torch.optim, plus LARS and LAMB, with fast fused steps.

    optimizer = thalweg.Adam(model.parameters(), lr=1e-3)      # exactly torch.optim.Adam
    optimizer = thalweg.create("lamb", model, lr=2e-3)         # by name, no-decay group built for you
"""

from . import distributed, schedules
from ._base import Optimizer
from .factory import create, names
from .optim import (ADOPT, ASGD, LAMB, LARS, SGD, Adadelta, Adafactor, Adagrad, Adam, Adamax, AdamW, Adan, AdEMAMix,
                    DAdaptAdam, Lion, Momentum, Muon, NAdam, Prodigy, RAdam, RMSprop, Rprop, SOAP, ScheduleFreeAdamW,
                    ScheduleFreeSGD, SparseAdam, StableAdamW)
from .optim.muon import MuonWithAdamW

__version__ = "0.1.0"
__all__ = ["SGD", "Momentum", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta", "ASGD",
           "Rprop", "SparseAdam", "LARS", "LAMB", "Adafactor", "Muon", "SOAP", "Lion", "Adan", "AdEMAMix", "ADOPT",
           "StableAdamW", "ScheduleFreeAdamW", "ScheduleFreeSGD", "Prodigy", "DAdaptAdam", "MuonWithAdamW", "Optimizer",
           "create", "names",
           "schedules", "arena", "distributed"]


def __getattr__(name: str):
    # The arena pulls in its tasks and plotting only when used: `import thalweg` stays light.
    if name == "arena":
        import importlib

        return importlib.import_module(".arena", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
