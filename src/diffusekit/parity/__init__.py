"""Parity with the reference fixtures: ``python -m diffusekit.parity DIR``."""
