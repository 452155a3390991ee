"""``python -m benchmarks``: the benchmark harness (see benchmarks/bench.py)."""

import sys

from benchmarks.bench import main

sys.exit(main())
