"""rae_scale: Representation Autoencoders and DiT-DH at cluster scale."""

__version__ = "0.1.0"
