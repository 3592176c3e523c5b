"""Peak resident memory of this process, for the converters' and benchmarks' reports."""
import re


def peak_rss_gib() -> float:
    """``VmHWM`` of this process (unlike ``ru_maxrss``, not inherited from the parent across ``execve``)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) / 1024**2
