"""This process's resident memory, as the benchmarks measure it (Linux ``/proc``; ``ru_maxrss`` elsewhere).

Imported by the benchmark scripts, which run with ``benchmarks/`` first on ``sys.path``.
"""

import os
import resource


def rss_now() -> int:
    """The resident set now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident set (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """The resident set's high-water mark (since the last reset), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
