"""Vanilla sequential fine-tuning: train on each task as it comes, nothing else."""

from topocl.registry import STRATEGIES
from topocl.strategies.base import Strategy


@STRATEGIES.register("vanilla")
class Vanilla(Strategy):
    name = "vanilla"
