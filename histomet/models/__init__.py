"""Torch modules: the CONCH-shaped patch encoder, the concept bank and the MIL heads.

Importing any submodule needs torch, which serving does not install.
"""
