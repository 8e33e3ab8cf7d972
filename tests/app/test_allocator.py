"""The command line restarts once under glibc's tuned malloc thresholds, unless told not to."""

import os
import platform
import subprocess
import sys

from vlblocks.app.allocator import KEEP_FREED_MEMORY, OPT_OUT, TUNABLES, restart_with_tuned_allocator, tuned_environment


def test_the_tuned_environment_is_only_for_glibc_linux_and_never_overrides_the_user():
    assert tuned_environment({"PATH": "/bin"}, "Linux", "glibc") == {"PATH": "/bin", TUNABLES: KEEP_FREED_MEMORY}
    assert tuned_environment({TUNABLES: "glibc.malloc.arena_max=2"}, "Linux", "glibc") is None
    assert tuned_environment({OPT_OUT: "1"}, "Linux", "glibc") is None
    assert tuned_environment({}, "Darwin", "") is None and tuned_environment({}, "Linux", "") is None


def test_the_command_restarts_itself_once_with_its_arguments(monkeypatch):
    restarts = []
    monkeypatch.setattr(os, "execve", lambda path, argv, environment: restarts.append((path, argv, environment)))
    monkeypatch.delenv(TUNABLES, raising=False)
    monkeypatch.delenv(OPT_OUT, raising=False)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/vlblocks", "train", "recipe.gin", "--resume"])
    restart_with_tuned_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        [(path, argv, environment)] = restarts
        assert path == sys.executable and argv == [sys.executable, "-m", "vlblocks", "train", "recipe.gin", "--resume"]
        assert environment[TUNABLES] == KEEP_FREED_MEMORY
    else:
        assert restarts == []
    monkeypatch.setenv(TUNABLES, KEEP_FREED_MEMORY)  # the restarted process
    restart_with_tuned_allocator()
    assert len(restarts) <= 1


def test_python_m_vlblocks_runs_after_restarting():
    environment = {key: value for key, value in os.environ.items() if key not in (TUNABLES, OPT_OUT)}
    result = subprocess.run([sys.executable, "-m", "vlblocks", "--help"], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0 and "Usage" in result.stdout, result.stderr
