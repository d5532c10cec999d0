"""`hbreg bench`: benchmarks that drive the real services and print throughput and latency percentiles.

Tests assert behaviour; these report speed. Record their output in docs/benchmarks.md.
"""
