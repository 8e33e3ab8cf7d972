"""The C allocator setting the command line starts under: glibc's malloc returns large freed blocks
to the system at once, and a training step that allocates and frees the same large tensors every
step then pays for fresh pages each time (hundreds of thousands of page faults per BERT-base
step). Raising the mmap and trim thresholds keeps those blocks in the process; it must be set
before Python starts, so the command re-executes itself once with it."""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional, Sequence

TUNABLES = "GLIBC_TUNABLES"
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=17179869184:glibc.malloc.trim_threshold=17179869184"
OPT_OUT = "VLBLOCKS_DEFAULT_ALLOCATOR"  # set to 1 to run under the allocator as it is


def tuned_environment(environment: Mapping[str, str], system: str, libc: str) -> Optional[dict[str, str]]:
    """The environment to re-execute under, or None when there is nothing to do: not Linux with
    glibc, the user already set GLIBC_TUNABLES, or opted out with VLBLOCKS_DEFAULT_ALLOCATOR=1."""
    if system != "Linux" or libc != "glibc" or TUNABLES in environment or environment.get(OPT_OUT) == "1":
        return None
    return {**environment, TUNABLES: KEEP_FREED_MEMORY}


def restart_with_tuned_allocator(arguments: Optional[Sequence[str]] = None) -> None:
    """Re-execute this Python program with the tuned allocator, once: `python ARGUMENTS`
    (default: `-m vlblocks` and this command's arguments)."""
    environment = tuned_environment(os.environ, platform.system(), platform.libc_ver()[0])
    if environment is not None:
        arguments = list(arguments) if arguments is not None else ["-m", "vlblocks", *sys.argv[1:]]
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *arguments], environment)
