"""Pre-training objectives: each prepares its inputs (masking) and computes its loss and metrics."""
