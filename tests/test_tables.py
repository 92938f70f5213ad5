"""The result tables of README.md and docs/ are the ones the committed results make (a stale table fails CI)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tables_are_generated_from_the_committed_results():
    result = subprocess.run([sys.executable, "benchmarks/make_tables.py", "--check"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_links_point_to_files_that_exist():
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_a_stale_or_hand_typed_figure_in_the_readme_prose_fails_the_check():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import make_tables

    readme = (ROOT / "README.md").read_text()
    assert make_tables.check_prose(readme) == []
    phrase = make_tables.prose_figures()[0]  # "9.3 and 9.7 ms per token at 32K and 128K"
    stale = readme.replace(phrase, phrase.replace(phrase.split()[0], "7.7", 1))
    assert any("lacks the computed phrase" in p for p in make_tables.check_prose(stale))
    start = readme.index(make_tables.HEADLINE[0])
    typed = readme[:start] + "A first call took 3.14 s here. " + readme[start:].replace(
        "* **Decoding**", "* **Decoding** (about 2.75x) ", 1)
    assert any("'2.75x'" in p for p in make_tables.check_prose(typed))
