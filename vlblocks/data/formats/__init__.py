"""One reader per public format (Conceptual Captions, COCO captions, VQA v2 and its answers, VCR, RefCOCO, bottom-up-attention features), the file helpers they share, the packed feature store and `data validate` / `pack`.
May import: vlblocks.data.
"""
