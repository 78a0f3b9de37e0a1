"""Benchmark the sparse backends: ``python tools/bench.py --help`` (works without installing sparkme)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, so `import sparkme` needs no install
from sparkme.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
