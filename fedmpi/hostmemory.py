"""What a rank's host says of its memory: how much is left for it (the kernel's MemAvailable, and the limit of every
cgroup that encloses the process less what that cgroup uses: a SLURM job's --mem is such a limit, so is a
container's), and how many processes the kernel's out-of-memory killer has killed. The preflight compares the
first with what data.cache=memory will decode; the sentinel (and preprocess, for its workers) reads the second
before and after a process dies by SIGKILL, to say whether the kernel killed it for memory. Page cache a cgroup
could drop (its inactive file pages) is not counted as used, as MemAvailable does not count it. Plain file reads,
no MPI: the sentinel runs before MPI.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as the page-rounded 2**63 - 1
PROC = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class _Files(NamedTuple):
    """A memory cgroup's file names in one cgroup version."""

    limit: str
    usage: str
    inactive: str  # the memory.stat key of its page cache it could drop
    events: str  # the file that holds its "oom_kill" count
    version: int


V2 = _Files("memory.max", "memory.current", "inactive_file", "memory.events", 2)
V1 = _Files("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file", "memory.oom_control", 1)


def available_memory(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this process may still allocate; None where the host says nothing (no /proc/meminfo, no limits). A
    limit may sit on the job while the step's own cgroup has none, so every enclosing cgroup counts."""
    found = [_meminfo(proc / "meminfo", "MemAvailable")]
    found += [_room(d, files) for d, files in _memory_cgroups(proc, cgroup_root)]
    known = [b for b in found if b is not None]
    return max(0, min(known)) if known else None


def memory_limit(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The tightest memory limit of the cgroups that enclose this process, in bytes; None without one."""
    limits = [_limit(d, files) for d, files in _memory_cgroups(proc, cgroup_root)]
    known = [b for b in limits if b is not None]
    return min(known) if known else None


class OomKills(NamedTuple):
    """The out-of-memory killer's counts: of processes in this process's own memory cgroup, and on the whole host;
    None where the kernel does not say (before Linux 4.13, or no memory cgroup). The kernel counts a kill in the
    victim's own cgroup (and, under cgroup v2, every cgroup above it: under v1 a SLURM job's cgroup stays at 0 while
    its task's counts the kill), so the count is read where the rank itself sits."""

    cgroup: int | None
    host: int | None


def oom_kills(proc: Path = PROC, cgroup_root: Path = CGROUP_ROOT) -> OomKills:
    own = next(iter(_memory_cgroups(proc, cgroup_root)), None)
    cgroup = _count(own[0] / own[1].events, "oom_kill") if own else None
    return OomKills(cgroup, _count(proc / "vmstat", "oom_kill"))


def killed_for_memory(before: OomKills, after: OomKills) -> bool | None:
    """Whether the out-of-memory killer killed a process here between the two readings: in this process's cgroup
    where the kernel counts that (the sentinel shares it with its rank), else on the host (another process's kill
    counts too); None where neither count was read twice."""
    for was, now in ((before.cgroup, after.cgroup), (before.host, after.host)):
        if was is not None and now is not None:
            return now > was
    return None


def kill_cause(for_memory: bool, remedy: str = "") -> str:
    """Who sent a SIGKILL, once killed_for_memory has said whether it was the kernel, with the limit that was reached
    and, for a kill for memory, the caller's `remedy`."""
    if not for_memory:
        return "not by the kernel's out-of-memory killer: by the scheduler, a user or another process"
    limit = memory_limit()
    if limit is None:
        room = "the host had"
    else:
        from preprocess.outputs import size_text

        room = (
            f"its memory cgroup's limit of {size_text(limit)} = {limit / 2**20:,.0f} MiB (a SLURM job's --mem, a "
            "container's) allowed"
        )
    return f"by the kernel's out-of-memory killer: the processes here asked for more memory than {room}" + (
        f"; {remedy}" if remedy else ""
    )


def _memory_cgroups(proc: Path, root: Path) -> Iterator[tuple[Path, _Files]]:
    """The memory cgroups that enclose this process, its own first, up to the hierarchy's root: cgroup v2's single
    hierarchy, or v1's memory controller."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and (root / "cgroup.controllers").is_file():
            files, mount = V2, root
        elif "memory" in controllers.split(","):
            files, mount = V1, root / "memory"
        else:
            continue
        here = mount / path.strip("/")
        while True:
            yield here, files
            if here == mount or mount not in here.parents:
                break
            here = here.parent


def _limit(directory: Path, files: _Files) -> int | None:
    try:
        text = (directory / files.limit).read_text().strip()
        return None if text == "max" or int(text) >= UNLIMITED else int(text)
    except (OSError, ValueError):
        return None


def _room(directory: Path, files: _Files) -> int | None:
    limit = _limit(directory, files)
    if limit is None:
        return None
    try:
        usage = int((directory / files.usage).read_text())
    except (OSError, ValueError):
        return None
    return limit - (usage - (_count(directory / "memory.stat", files.inactive) or 0))


def _count(path: Path, key: str) -> int | None:
    """The value of `key` in a file of "key value" lines (memory.stat, memory.events, /proc/vmstat)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _meminfo(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
