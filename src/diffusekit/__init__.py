"""diffusekit: readable, fast diffusion models on PyTorch."""

__version__ = "0.1.0"
