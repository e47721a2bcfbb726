"""HistoMet: metastasis risk and site prediction from a whole-slide image."""

__version__ = "0.1.0"
