"""What git knows about a code version: its commit time, the order of two versions and the commits
between them (for `harness runs` and `harness history`). Every call is bounded (a timeout) and never
raises: a version git does not know (another clone, a "(declared)" or package version) gives None.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
_SHA = re.compile(r"[0-9a-f]{7,40}")
GIT_TIMEOUT_S = 10


def version_sha(version: str) -> str | None:
    """The commit a code version names (its hex part before "+dirty..."), or None (not a git SHA)."""
    head = version.split("+", 1)[0].split(" ", 1)[0].strip()  # "<sha> (declared)" names a commit too
    return head if _SHA.fullmatch(head) else None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1024)
def commit_time(version: str) -> int | None:
    """Unix time of the commit `version` names (committer date), None when git does not know it."""
    sha = version_sha(version)
    out = _git("log", "-1", "--format=%ct", sha, "--") if sha else None
    return int(out) if out and out.isdigit() else None


@functools.lru_cache(maxsize=1024)
def commits_between(older: str, newer: str) -> int | None:
    """How many commits `newer` has that `older` has not (`git rev-list --count older..newer`); None
    when git does not know both."""
    a, b = version_sha(older), version_sha(newer)
    out = _git("rev-list", "--count", f"{a}..{b}") if a and b else None
    return int(out) if out and out.isdigit() else None


def commit_range(older: str, newer: str) -> str:
    """`older..newer` (short SHAs) with the number of commits in it when git knows both."""
    count = commits_between(older, newer)
    a, b = version_sha(older) or older, version_sha(newer) or newer
    return f"{a[:12]}..{b[:12]}" + (f" ({count} commit{'s' if count != 1 else ''})" if count is not None else "")
