"""The embedded demo: drawn scenes of coloured shapes written in the public layouts (Conceptual Captions, VQA v2, VCR, RefCOCO+), read back by the same readers as real data.
May import: vlblocks.contracts, vlblocks.ops, vlblocks.data, vlblocks.data.formats, vlblocks.data.pipeline.
"""
