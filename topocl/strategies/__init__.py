"""Continual-learning strategies, one small file each, registered in `topocl.registry.STRATEGIES`."""

from topocl.strategies.dream import DreamConfig
from topocl.strategies.ewc import EWCConfig
from topocl.strategies.replay import ReplayConfig
from topocl.strategies.vanilla import Vanilla

__all__ = ["DreamConfig", "EWCConfig", "ReplayConfig", "Vanilla"]
