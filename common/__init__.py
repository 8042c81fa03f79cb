"""Pieces every Doppel package may import: the error vocabulary. Imports nothing of ours."""
