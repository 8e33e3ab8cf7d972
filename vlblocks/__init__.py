"""vlblocks: composable blocks for visual-linguistic Transformers; `batch.py` (VLBatch), `contracts.py` and `seeding.py` are the base every layer stands on.
May import: nothing else of vlblocks.
"""
