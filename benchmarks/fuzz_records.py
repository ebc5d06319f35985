"""Fuzz the record decoder, key records and session loader with 100,000 examples each.

CI runs the same properties (tests/test_fuzz.py) with a few hundred examples; this
is the long run, for a release or after touching the codec, crypto or a store:

    .venv/bin/python benchmarks/fuzz_records.py                 # 100,000 per property
    .venv/bin/python benchmarks/fuzz_records.py --examples 5000

It exits non-zero if any example loads hostile bytes into anything but a session
or an ``EngineError``, runs past its deadline, or allocates beyond its bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1] / "tests" / "test_fuzz.py"


def main() -> int:
    """Run tests/test_fuzz.py with many examples; return pytest's exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000, help="examples per property")
    args = parser.parse_args()
    os.environ["STEPVAULT_FUZZ_EXAMPLES"] = str(args.examples)
    started = time.perf_counter()
    code = pytest.main(["-q", "--hypothesis-show-statistics", "-p", "no:cacheprovider", str(TESTS)])
    print(f"{args.examples} examples per property in {time.perf_counter() - started:.0f} s")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())
