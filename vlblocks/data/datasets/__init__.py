"""Each task's dataset (pre-training, the text-only corpus, VQA, VCR, RefCOCO+) and the builder a recipe names, which falls back to the demo when no data is configured.
May import: vlblocks.batch, vlblocks.contracts, vlblocks.seeding, vlblocks.data, vlblocks.data.formats, vlblocks.data.pipeline, vlblocks.data.demo.
"""
