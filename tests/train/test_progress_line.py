import io
import sys

from vlblocks.train.logging import ProgressLine


def test_progress_goes_to_the_stderr_of_the_moment(monkeypatch):
    """Not to the stream that was sys.stderr at import: a CLI runner (or a notebook) swaps it per call."""
    for _ in range(2):
        captured = io.StringIO()
        monkeypatch.setattr(sys, "stderr", captured)
        ProgressLine(total=4).update(2, {"mlm/loss": 1.5, "mlm/count": 3.0}, samples_per_second=10.0)
        assert captured.getvalue() == "[############............] 2/4 mlm_loss 1.500 | 10.0 samples/s\n"
        captured.close()
