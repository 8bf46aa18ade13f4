"""ddpm-trainer: the diffusers "Train a diffusion model" tutorial, made production-grade."""

__version__ = "0.1.0"
