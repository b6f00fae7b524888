"""A variational autoencoder on MNIST, run as a versioned, tracked, orchestrated pipeline."""

__version__ = "0.1.0"
