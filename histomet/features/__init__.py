"""Per-slide tile features in HDF5 files, and ``histomet embed`` that writes them.

Nothing in this package imports torch.
"""
