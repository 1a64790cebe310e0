"""The optimizers, one module each."""

from .adagrad import Adagrad
from .adam import Adam, AdamW
from .lamb import LAMB
from .lars import LARS
from .rmsprop import RMSprop
from .sgd import SGD, Momentum

__all__ = ["SGD", "Momentum", "Adam", "AdamW", "RMSprop", "Adagrad", "LARS", "LAMB"]
