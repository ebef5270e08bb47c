"""``python -m moe_dispatch.bench --help``. The work lives in runner.py: spawned ranks must import
their entry point from a real module, not from ``__main__``."""
import sys

from .runner import main

sys.exit(main())
