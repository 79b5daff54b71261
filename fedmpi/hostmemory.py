"""How much memory a rank's host has left for it: the kernel's MemAvailable, and the limit of every cgroup that
encloses the process less what the cgroup uses (a SLURM job's --mem is such a limit; so is a container's). The
preflight compares it with what data.cache=memory will decode, so a cache that cannot fit is refused before any
volume is read, where it was the OOM killer's SIGKILL of a rank during start-up. Page cache a cgroup could drop
(its inactive file pages) is not counted as used, as MemAvailable does not count it."""

from __future__ import annotations

from pathlib import Path

UNLIMITED = 1 << 62  # cgroup v1 writes "no limit" as the page-rounded 2**63 - 1


def available_memory(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process may still allocate; None where the host says nothing (no /proc/meminfo, no limits)."""
    found = [_mem_available(proc / "meminfo"), *_cgroup_room(proc / "self" / "cgroup", cgroup_root)]
    known = [b for b in found if b is not None]
    return max(0, min(known)) if known else None


def _mem_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key == "MemAvailable":
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(self_cgroup: Path, root: Path) -> list[int | None]:
    """Limit less usage of each memory cgroup from the process's own up to the hierarchy's root (a limit may sit on
    the job while the step's own cgroup has none). cgroup v2's single hierarchy, or v1's memory controller."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    out: list[int | None] = []
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        if controllers == "" and (root / "cgroup.controllers").is_file():
            files, mount = ("memory.max", "memory.current", "inactive_file"), root
        elif "memory" in controllers.split(","):
            files, mount = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"), root / "memory"
        else:
            continue
        here = mount / path.strip("/")
        while True:
            out.append(_room(here, *files))
            if here == mount or mount not in here.parents:
                break
            here = here.parent
    return out


def _room(directory: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    try:
        text = (directory / limit_file).read_text().strip()
        if text == "max" or int(text) >= UNLIMITED:
            return None
        usage = int((directory / usage_file).read_text())
    except (OSError, ValueError):
        return None
    inactive = 0
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
    except (OSError, ValueError):
        pass
    return int(text) - (usage - inactive)
