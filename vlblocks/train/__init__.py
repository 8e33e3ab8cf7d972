"""Training: the loop (Trainer), optimisers and schedules, checkpoints, evaluation and logging.
May import: vlblocks.batch, vlblocks.contracts, vlblocks.seeding, vlblocks.metrics, vlblocks.blocks, vlblocks.models, vlblocks.objectives, vlblocks.data, vlblocks.data.pipeline, vlblocks.data.datasets.
"""
