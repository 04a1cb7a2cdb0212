"""Benchmarks: the side-by-side comparison with TRL and Tunix (``compare``) and its shared workload."""
