"""Pure tensor operations (no modules, no parameters) that both the model and the data column use.
May import: nothing else of vlblocks.
"""

from vlblocks.ops.roi_align import roi_align

__all__ = ["roi_align"]
