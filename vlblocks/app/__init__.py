"""The application layer: gin registration, recipe parsing, run orchestration and model description; what the CLI calls.
May import: vlblocks.batch, vlblocks.contracts, vlblocks.blocks, vlblocks.models, vlblocks.objectives, vlblocks.data.pipeline, vlblocks.data.demo, vlblocks.data.formats, vlblocks.data.errors, vlblocks.data.datasets, vlblocks.train, vlblocks.interop.
"""
