"""Doppel: a person's digital double. The command line and the composition roots live here."""

__version__ = "0.1.0"
