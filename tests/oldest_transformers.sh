#!/usr/bin/env bash
# The model tests against the oldest transformers setup.py supports (TRANSFORMERS_LOWER_BOUND), in a
# virtualenv that sees the installed packages (torch, this package) and overrides transformers alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bound=$(python3 -c 'import re; print(re.search(r"TRANSFORMERS_LOWER_BOUND = \"(.*)\"", open("setup.py").read())[1])')
venv=${OLDEST_VENV:-/tmp/moe_dispatch-transformers-$bound}
[ -x "$venv/bin/python" ] || python3 -m venv --system-site-packages "$venv"
"$venv/bin/python" -m pip install -q "transformers==$bound"
"$venv/bin/python" -c "import transformers; print('transformers', transformers.__version__, '(lower bound)')"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/models tests/test_routing.py
