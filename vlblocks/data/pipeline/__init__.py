"""From records to batches: WordPiece tokenisation, the image transform and flip, encoded samples, collation with dynamic padding, length-bucket sampling.
May import: vlblocks.batch, vlblocks.contracts, vlblocks.data, vlblocks.data.formats.
"""
