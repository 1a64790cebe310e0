"""The optimizers, one module each."""

from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adan import Adan
from .adam import Adam, AdamW
from .adamax import Adamax
from .ademamix import AdEMAMix
from .adopt import ADOPT
from .asgd import ASGD
from .dadapt_adam import DAdaptAdam
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .muon import Muon
from .nadam import NAdam
from .prodigy import Prodigy
from .radam import RAdam
from .rmsprop import RMSprop
from .rprop import Rprop
from .schedule_free import ScheduleFreeAdamW, ScheduleFreeSGD
from .sgd import SGD, Momentum
from .soap import SOAP
from .sparse_adam import SparseAdam
from .stable_adamw import StableAdamW

__all__ = ["SGD", "Momentum", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "RMSprop", "Adagrad", "Adadelta", "ASGD",
           "Rprop", "SparseAdam", "LARS", "LAMB", "Adafactor", "Muon", "SOAP", "Lion", "Adan", "AdEMAMix", "ADOPT", "StableAdamW",
           "ScheduleFreeAdamW", "ScheduleFreeSGD", "Prodigy", "DAdaptAdam"]
