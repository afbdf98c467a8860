"""Escort Serve: GPU inference for pruned CNNs with the Escort direct sparse convolution."""

__version__ = "0.1.0"
