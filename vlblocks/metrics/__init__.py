"""Metrics as `torchmetrics.Metric` objects: they accumulate on the device without waiting for it and reduce across processes when computed.
May import: nothing else of vlblocks.
"""

from vlblocks.metrics.running import TaskMetrics, Total, WeightedMean

__all__ = ["TaskMetrics", "Total", "WeightedMean"]
