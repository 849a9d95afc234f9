"""The README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_blocks_run(index, capsys):
    block = python_blocks()[index]
    if "redis" in block.lower() and "redis_url" not in block:
        pytest.skip("Redis examples run in tests/test_redis_fleet.py")
    exec(compile(block, f"README.md[python block {index}]", "exec"), {})


def test_package_docstring_example():
    import doctest

    import pysched

    result = doctest.testmod(pysched)
    assert result.attempted > 0 and result.failed == 0
