"""The step decorator's public typing: ``mypy --strict tests/typing`` must pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / "tests" / "typing"


def _mypy(cache: Path, *targets: Path) -> subprocess.CompletedProcess[str]:
    """Run mypy --strict from the project root, so pyproject.toml's settings apply."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), *map(str, targets)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for this module's mypy runs: the second one reuses the first's work."""
    return tmp_path_factory.mktemp("mypy-cache")


def test_step_decorator_typing_passes_mypy_strict(mypy_cache: Path) -> None:
    result = _mypy(mypy_cache, CHECKS)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues found" in result.stdout


def test_the_typing_check_catches_a_wrong_type(mypy_cache: Path, tmp_path: Path) -> None:
    """A control: the same file with one expectation wrong must fail, or the check is blind."""
    # Given the typing checks with one assertion changed to a wrong type
    source = (CHECKS / "check_step_decorator.py").read_text()
    right = "assert_type(count(ctx, pages), int)"
    assert right in source
    broken = tmp_path / "check_step_decorator.py"
    broken.write_text(source.replace(right, "assert_type(count(ctx, pages), str)"))

    # When mypy checks it
    result = _mypy(mypy_cache, broken)

    # Then it reports that mismatch, on that line
    line = source[: source.index(right)].count("\n") + 1
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [row for row in result.stdout.splitlines() if ": error:" in row]
    assert any(f":{line}: error:" in row and "[assert-type]" in row for row in errors), errors
