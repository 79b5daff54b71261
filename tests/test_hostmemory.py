"""available_memory on made-up /proc and cgroup trees (v1 and v2, a limit on the job above the step's own
cgroup), and on this machine."""

from __future__ import annotations

from pathlib import Path

from fedmpi.hostmemory import available_memory

GIB = 1 << 30


def _tree(tmp_path: Path, self_cgroup: str, mem_available_kb: int | None = 20 * GIB // 1024):
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    root.mkdir()
    if mem_available_kb is not None:
        (proc / "meminfo").write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {mem_available_kb} kB\n")
    (proc / "self" / "cgroup").write_text(self_cgroup)
    return proc, root


def _write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def test_without_cgroups_it_is_the_kernels_mem_available(tmp_path):
    proc, root = _tree(tmp_path, "")
    assert available_memory(proc, root) == 20 * GIB


def test_a_cgroup_v2_limit_on_the_job_above_the_steps_own_cgroup_counts(tmp_path):
    """SLURM puts the limit on the job's cgroup; the step's own says max. Dropable page cache is not used."""
    proc, root = _tree(tmp_path, "0::/slurm/job_1/step_0\n")
    (root / "cgroup.controllers").write_text("cpu memory\n")
    job = root / "slurm" / "job_1"
    _write(
        job,
        memory_max=str(2 * GIB),
        memory_current=str(GIB + GIB // 2),
        memory_stat=f"anon 1\ninactive_file {GIB // 2}\n",
    )
    _write(job / "step_0", memory_max="max\n", memory_current="5\n")
    assert available_memory(proc, root) == GIB


def test_a_cgroup_v1_memory_limit_counts_and_no_limit_is_none(tmp_path):
    proc, root = _tree(tmp_path, "5:cpu,cpuacct:/x\n4:memory:/slurm/uid_0/job_2\n0::/\n")
    _write(root / "memory", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="7\n")
    job = root / "memory" / "slurm" / "uid_0" / "job_2"
    _write(
        job, memory_limit_in_bytes=str(3 * GIB), memory_usage_in_bytes=str(GIB), memory_stat="total_inactive_file 0\n"
    )
    assert available_memory(proc, root) == 2 * GIB
    _write(job, memory_limit_in_bytes="9223372036854771712\n")
    assert available_memory(proc, root) == 20 * GIB  # no limit anywhere: the kernel's figure


def test_nothing_readable_is_none_and_usage_over_the_limit_is_no_room(tmp_path):
    proc, root = _tree(tmp_path, "garbage", mem_available_kb=None)
    assert available_memory(proc, root) is None
    proc, root = _tree(tmp_path / "over", "4:memory:/job\n")
    _write(root / "memory" / "job", memory_limit_in_bytes=str(GIB), memory_usage_in_bytes=str(2 * GIB))
    assert available_memory(proc, root) == 0


def test_this_machine_says_how_much_is_left():
    room = available_memory()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        total = next(
            int(line.split()[1]) * 1024 for line in meminfo.read_text().splitlines() if line.startswith("MemTotal:")
        )
        assert room is not None and 0 < room <= total
