"""HistoSPACE in JAX/Flax: spatially resolved gene expression predicted from H&E histology tiles."""

__version__ = "0.1.0"
