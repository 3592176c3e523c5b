"""Peak resident memory of this process, for the converters' and benchmarks' reports."""
import resource


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB
