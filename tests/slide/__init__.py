"""Helpers for the slide tests: small synthetic TIFF slides written with tifffile."""
