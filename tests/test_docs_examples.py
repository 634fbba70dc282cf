"""Every Python example in README.md and docs/ runs as written (fresh namespace, its own asserts)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _examples():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for m in _BLOCK.finditer(text):
            line = text[: m.start()].count("\n") + 2
            yield pytest.param(m.group(1), id=f"{doc.relative_to(ROOT)}:{line}")


EXAMPLES = list(_examples())


def test_the_docs_have_python_examples():
    assert len(EXAMPLES) >= 3      # README's kernels and compressor, docs/compressor.md


@pytest.mark.parametrize("code", EXAMPLES)
def test_python_example_runs_as_written(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)    # anything it writes lands here
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
