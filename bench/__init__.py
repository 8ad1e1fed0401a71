"""Benchmarks (dev only, extra `bench`): edge-bench, its peers and the profiling scripts. Nothing a
board imports depends on this package."""
