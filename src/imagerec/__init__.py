"""imagerec: train convolutional image classifiers and serve them over HTTP with hug."""

__version__ = "0.1.0"
