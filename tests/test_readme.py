"""The README's code runs as printed: a newcomer's first contact with the library."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_blocks_of_the_readme_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README shows the library in Python"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
