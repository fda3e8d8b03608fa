"""The guide (book/guide.md) runs as printed: its Python blocks, in order, in one namespace."""

import re
from pathlib import Path

GUIDE = Path(__file__).resolve().parents[1] / "book" / "guide.md"


def test_the_python_blocks_of_the_guide_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the guide writes scores.nc and plan.json where it runs
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert len(blocks) >= 6, "the guide shows the main calls in Python"
    namespace = {}
    for code in blocks:
        exec(compile(code, str(GUIDE), "exec"), namespace)
    assert namespace["days"].shape == (2, 18)
    assert "stored bits per parameter" in capsys.readouterr().out


def test_the_guide_is_linked_from_the_api_page_the_readme_and_the_toc():
    book = GUIDE.parent
    assert "(guide.md)" in (book / "api.md").read_text()
    assert "book/guide.md" in (book.parent / "README.md").read_text()
    toc = (book / "_toc.yml").read_text()
    assert toc.index("file: guide") < toc.index("file: api")
