"""Files the commands write whole or not at all: through a temporary file beside the target,
renamed over it, so a reader never sees half a file and a failure leaves what was there."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write` with a temporary path in `path`'s folder, then rename it to `path`; on any
    failure the temporary file is removed and the error raised."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(text: str, path: str | Path) -> Path:
    """`text` as UTF-8 (newlines as given) to `path`, atomically."""
    return write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8", newline=""))
