"""The shared-memory segments multi-process engines leave in /dev/shm, and their removal.

vLLM's CPU communicator (TP > 1) names its segments after a port
(`<port>-tp:0-[0-1]-cpushm_<rank>`), and its message queues use Python's
`psm_<hex>` segments. A worker that is killed, or an engine torn down by
terminate(), leaves them behind: 8-250 MiB each, and a later engine that draws
the same port fails with EEXIST. A segment is removed only when no living
process maps it, so a server another test (or pytest-xdist worker) is running
keeps its own.
"""

from pathlib import Path

SHM = Path("/dev/shm")
VLLM_SEGMENTS = ("psm_", "cpushm")  # Python's SharedMemory prefix; vLLM's CPU communicator's suffix


def _is_vllms(name: str) -> bool:
    return name.startswith(VLLM_SEGMENTS[0]) or VLLM_SEGMENTS[1] in name


def segments() -> set[str]:
    """vLLM-made segments in /dev/shm now."""
    try:
        return {p.name for p in SHM.iterdir() if _is_vllms(p.name)}
    except OSError:
        return set()


def mapped() -> set[str]:
    """Segments some living process has mapped (from /proc/*/maps)."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            at = line.find(str(SHM) + "/")
            if at >= 0:
                names.add(line[at + len(str(SHM)) + 1 :].removesuffix(" (deleted)"))
    return names


def remove_orphans(names: set[str]) -> list[str]:
    """Unlink those of `names` that no living process maps; returns what was removed."""
    removed = []
    if not names:  # the common case: reading every process's maps is the costly part
        return removed
    for name in sorted(names - mapped()):
        try:
            (SHM / name).unlink()
            removed.append(name)
        except FileNotFoundError:
            pass
    return removed
