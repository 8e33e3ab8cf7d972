"""Read plain files and zip members addressed as `archive.zip@/member/path`.

This is the addressing scheme of the official VL-BERT data (e.g. `train_image.zip@/00000000.jpg`).
The part after `.zip@` is the member name; a leading `/` is optional and the member is looked up
both without and with it, so archives written either way can be read.

The official code reads such a path either from the archive (`ZIP_MODE: true`) or, as every
shipped pre-training config does (`ZIP_MODE: false`), from the archive unzipped into a folder
of the same name: `train_image.zip@/00000000.jpg` → `train_image/00000000.jpg`.
`read_zipped_or_unzipped` reads both layouts.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Sequence

from vlblocks.data.errors import DataError

ZIP_SEPARATOR = ".zip@"
MAX_OPEN_ARCHIVES = 32

# (pid, resolved archive path) -> (stat signature, open archive). Keyed by pid because a zip file
# object inherited through fork shares its file offset with the parent and must not be used.
_archives: OrderedDict[tuple[int, str], tuple[tuple[int, int], zipfile.ZipFile]] = OrderedDict()
_lock = threading.Lock()


def split_zip_path(path: str) -> tuple[str, str] | None:
    """Splits `archive.zip@/member` into (`archive.zip`, `member`); None for a plain path."""
    position = path.find(ZIP_SEPARATOR)
    if position < 0:
        return None
    archive_end = position + len(".zip")
    return path[:archive_end], path[archive_end + 1 :].lstrip("/")


def resolve(path: str | Path, root: Path) -> str:
    """Returns `path` with its file part (the archive for zip paths) made absolute against `root`."""
    text = str(path)
    if os.path.isabs(text):
        return text
    return str(Path(root) / text)


def read_bytes(path: str | Path, root: Path) -> bytes:
    """Reads a plain file or a zip member.

    Args:
        path: a file path or `archive.zip@/member`; relative paths are relative to `root`.
        root: folder that relative paths are resolved against.

    Raises:
        DataError: the file, archive or member is missing, or the archive is not a zip.
    """
    full = resolve(path, root)
    parts = split_zip_path(full)
    if parts is None:
        try:
            return Path(full).read_bytes()
        except (OSError, ValueError) as error:  # ValueError: a name no file can have (a NUL byte)
            raise DataError(f"cannot read file {full!r}: {getattr(error, 'strerror', None) or error}") from error
    archive_path, member = parts
    archive = _open_archive(archive_path, member)
    for name in (member, "/" + member):
        try:
            info = archive.getinfo(name)
        except KeyError:
            continue
        with _lock:
            return archive.read(info)
    raise DataError(f"zip archive {archive_path} has no member {member!r}")


def unzipped_path(path: str, archive_name_drops: Sequence[str] = ()) -> str | None:
    """Where the member of `archive.zip@/member` lies once the archive is unzipped into a folder
    named after it: `archive/member`; None for a plain path.

    Args:
        path: a path, relative or absolute.
        archive_name_drops: substrings removed from the archive's file name (not its folders or
            the member), e.g. shard numbers, so that `train_frcnn.0.zip@/x.json` → `train_frcnn/x.json`.
    """
    parts = split_zip_path(path)
    if parts is None:
        return None
    archive, member = parts
    folder, name = os.path.split(archive[: -len(".zip")])
    for text in archive_name_drops:
        name = name.replace(text, "")
    return os.path.join(folder, name, member)


def read_zipped_or_unzipped(
    path: str, root: Path, zip_mode: Optional[bool] = None, archive_name_drops: Sequence[str] = ()
) -> bytes:
    """Reads a plain file, or a zip member from its archive or from the unzipped folder.

    Args:
        path: a file path or `archive.zip@/member`; relative paths are relative to `root`.
        root: folder that relative paths are resolved against.
        zip_mode: True reads members from the archive, False from the unzipped folder
            (`unzipped_path`); None (automatic) reads the unzipped file when it exists, else the
            archive. A plain path is read as it is in every mode.
        archive_name_drops: see `unzipped_path`.

    Raises:
        DataError: the file, archive or member is missing (in automatic mode: neither the
            unzipped file nor the archive exists, both named).
    """
    unzipped = unzipped_path(str(path), archive_name_drops)
    if unzipped is None or zip_mode is True:
        return read_bytes(path, root)
    if zip_mode is False or os.path.isfile(resolve(unzipped, root)):
        return read_bytes(unzipped, root)
    archive, member = split_zip_path(resolve(path, root))
    if os.path.exists(archive):
        return read_bytes(path, root)
    raise DataError(
        f"neither the unzipped file {resolve(unzipped, root)} nor the zip archive {archive} "
        f"(member {member!r}) exists"
    )


def _open_archive(archive_path: str, member: str) -> zipfile.ZipFile:
    """Returns the cached open archive of this process, reopening it if the file changed."""
    try:
        stat = os.stat(archive_path)
    except (OSError, ValueError) as error:
        raise DataError(
            f"zip archive {archive_path!r} (for member {member!r}) cannot be opened: "
            f"{getattr(error, 'strerror', None) or error}"
        ) from error
    signature = (stat.st_mtime_ns, stat.st_size)
    key = (os.getpid(), archive_path)
    with _lock:
        cached = _archives.get(key)
        if cached is not None and cached[0] == signature:
            _archives.move_to_end(key)
            return cached[1]
        if cached is not None:
            cached[1].close()
            del _archives[key]
        _drop_other_processes(key[0])
        try:
            archive = zipfile.ZipFile(archive_path)
        except (OSError, zipfile.BadZipFile) as error:
            raise DataError(
                f"zip archive {archive_path} (for member {member!r}) cannot be opened: {error}"
            ) from error
        _archives[key] = (signature, archive)
        while len(_archives) > MAX_OPEN_ARCHIVES:
            _, (_, oldest) = _archives.popitem(last=False)
            oldest.close()
        return archive


def _drop_other_processes(pid: int) -> None:
    """Forgets archives opened by a parent process (without closing: the parent still uses them)."""
    for key in [key for key in _archives if key[0] != pid]:
        del _archives[key]


def clear_cache() -> None:
    """Closes this process's open archives (e.g. before deleting or rewriting them)."""
    with _lock:
        pid = os.getpid()
        for key in list(_archives):
            if key[0] == pid:
                _archives[key][1].close()
            del _archives[key]
