"""Triton kernels and their launchers. Each module imports torch and triton only (nothing else of
ours); import them lazily, since importing ``moe_dispatch`` must never require triton."""
