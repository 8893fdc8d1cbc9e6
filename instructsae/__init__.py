"""instructsae: sparse autoencoders for instruct models (FAST extraction -> zarr store -> SAE sweeps)."""

__version__ = "0.1.0"
