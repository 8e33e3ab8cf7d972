"""vlblocks: composable blocks for visual-linguistic Transformers; `batch.py` (VLBatch) and `contracts.py` are the base every layer stands on.
May import: nothing else of vlblocks.
"""
