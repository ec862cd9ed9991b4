"""Attention kinds, chosen by name from `topocl.registry.ATTENTION`. Importing this package registers
every kind."""

from topocl.attention import dense, dsa, nsa, split  # noqa: F401  (registers the kinds)
