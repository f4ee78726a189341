"""The benchmark harness behind ``python -m vit_kernels bench`` / ``profile-attention`` and
benchmarks/: timers (CUDA events or perf_counter), statistics, providers, the peaks table,
the cost model, writers (table, CSV, JSON, PNG) and the per-stage block profiler.

Nothing here runs at import; matplotlib and rich are imported only when used.
"""
