"""Attention kinds, chosen by name from `topocl.registry.ATTENTION`. Importing this package registers
every kind."""

from topocl.attention import dense, split  # noqa: F401  (registers "dense", "split")
