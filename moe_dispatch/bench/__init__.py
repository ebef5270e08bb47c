"""Benchmark CLI: ``python -m moe_dispatch.bench`` (console script ``moe-dispatch-bench``)."""
