"""duo-unlearn: remove concepts from text-to-image diffusion models with DUO (Park et al., NeurIPS 2024)."""

__version__ = "0.1.0"
