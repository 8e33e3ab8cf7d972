"""Weights in and out: strict initialisation of VL-BERT from a local HF-format BERT directory.
May import: vlblocks.models, vlblocks.train, vlblocks.data.errors, vlblocks.data.formats.
"""
