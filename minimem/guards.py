"""Checks that turn a bad request into one clear line before any work starts.

The trainer and the command-line tools (:mod:`minimem_tools`) share them: an output folder that
cannot hold what a command writes, and a job that cannot fit in the memory that is left. Each raises
(or returns) a message that names the flag or field and the fix; the caller prints it as its one
error line.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

MEMINFO = Path("/proc/meminfo")
CGROUP_LIMITS = (  # (limit, usage): cgroup v2, then v1
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
)


def check_output_folder(path: str | Path, flag: str) -> Path:
    """``path`` as a folder that exists or can be created, and can be written: ValueError otherwise.

    Writability is probed with a real temporary file in the nearest existing folder: permission
    bits do not tell (root writes anyway; a read-only mount refuses everyone).
    """
    path = Path(path)
    existing = path
    while not existing.exists():  # the deepest part of the path that exists ('.' does)
        existing = existing.parent
    if existing == path and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder: give the path of a folder (new or existing)")
    if not existing.is_dir():
        raise ValueError(f"{flag} {path} is under {existing}, which is a file: choose a path outside it")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(
            f"{flag} {path}: cannot write in {existing} ({err.strerror}): choose a writable folder"
        ) from None
    return path


def available_memory(device) -> tuple[Optional[int], str]:
    """Bytes that may still be allocated on ``device`` (a torch.device), and where the figure comes from.

    On CUDA: the device's free memory. On CPU: the smaller of MemAvailable (/proc/meminfo, which
    counts reclaimable caches) and what the cgroup limit leaves, if there is one; ``(None,
    "unknown")`` where neither can be read (not Linux, say).
    """
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    found = []
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, f"MemAvailable in {MEMINFO}"))
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in CGROUP_LIMITS:
        try:
            cap, used = int(limit.read_text()), int(usage.read_text())
        except (OSError, ValueError):  # no such file, or "max": no limit
            continue
        if cap < 2**60:  # cgroup v1 writes a huge number for "no limit"
            found.append((max(cap - used, 0), f"the limit in {limit}"))
    return min(found) if found else (None, "unknown")


def memory_problem(need: int, device, flags: str) -> Optional[str]:
    """None when ``need`` bytes fit on ``device`` (or the free memory is unknown), else a message
    naming the ``flags`` to lower. Callers pass a floor on what they will allocate, before
    allocating anything, so an absurd size is refused at once instead of ending in the
    allocator's traceback.
    """
    have, _ = available_memory(device)
    if have is None or need <= have:
        return None
    return (
        f"{flags} as given need at least {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB "
        f"available on {device}; lower them"
    )
