"""The README's Python examples run as written, on the embedded model (slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).parents[1] / "README.md"


def _snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_python_examples_that_import_from_the_top_level():
    snippets = _snippets()
    assert snippets
    for code in snippets:
        for line in re.findall(r"^from (pyramidkv[\w.]*) import", code, flags=re.M):
            assert line == "pyramidkv", f"README example imports from {line}, not the top level"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_snippets())))
def test_each_readme_example_runs(index, capsys):
    snippet = _snippets()[index]
    namespace: dict = {}
    exec(compile(snippet, f"README.md example {index + 1}", "exec"), namespace)
    assert capsys.readouterr().out.strip(), "the example prints what it computed"
