"""The documentation's own invariants: the README stays the user's path (short), design citations in
the code resolve to docs/design.md, and relative links in the markdown point at files that exist.
Text only: no model, no torch."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
README_MAX_LINES = 400
SECTION = "\u00a7"  # the section sign, spelled out so this file cites nothing itself

# "<sign>3" or a range "<sign>3-<sign>4" / "<sign>3-4" / en dash
CITATION = re.compile(SECTION + r"(\d+)(?:\s*[-\u2013]\s*" + SECTION + r"?(\d+))?")
OLD_CITATION = re.compile(r"DESIGN(?:\.md)?\s*" + SECTION)
HEADING = re.compile(r"^## (\d+)\. ", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _py_files(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)


def _design_sections() -> set[int]:
    return {int(n) for n in HEADING.findall(DESIGN.read_text(encoding="utf-8"))}


def _markdown_files() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "README.md", *sorted(docs.glob("*.md")), *sorted((docs / "experiments").glob("*.md"))]


def test_readme_is_at_most_400_lines():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (limit {README_MAX_LINES}): move experiment logs to "
        "docs/experiments/ and design detail to docs/design.md"
    )


def test_design_has_sections_1_to_14():
    assert DESIGN.is_file(), "docs/design.md is missing"
    numbers = [int(n) for n in HEADING.findall(DESIGN.read_text(encoding="utf-8"))]
    assert numbers == list(range(1, 15)), f"docs/design.md top-level sections are {numbers}, expected 1..14 in order"


def test_section_citations_in_code_resolve_to_design_headings():
    sections = _design_sections()
    bad = []
    for path in _py_files("llada_train", "benchmarks", "tests"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in CITATION.finditer(line):
                first = int(match.group(1))
                last = int(match.group(2)) if match.group(2) else first
                wanted = set(range(first, last + 1)) if first <= last else {first, last}
                missing = sorted(wanted - sections)
                if missing:
                    where = f"{path.relative_to(ROOT)}:{lineno}"
                    bad.append(f"{where}: {match.group(0)} (no '## n.' heading for {missing})")
    assert not bad, "citations without a section in docs/design.md:\n" + "\n".join(bad)


def test_code_cites_docs_design_md_not_the_old_design_file():
    bad = []
    for path in _py_files("llada_train"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OLD_CITATION.search(line) and "docs/design.md" not in line:
                bad.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not bad, "cite 'docs/design.md ' + section, not 'DESIGN ' + section:\n" + "\n".join(bad)


def _relative_links(text: str) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith(("#", "/")):
            continue  # a URL (http:, mailto:), an anchor in the same page, or an absolute path
        targets.append(target.split("#", 1)[0])
    return [t for t in targets if t]


def test_relative_markdown_links_point_to_existing_files():
    bad = []
    for md in _markdown_files():
        for target in _relative_links(md.read_text(encoding="utf-8")):
            if not (md.parent / target).exists():
                bad.append(f"{md.relative_to(ROOT)}: ({target})")
    assert not bad, "relative links to missing files:\n" + "\n".join(bad)


def test_link_finder_sees_links_and_skips_code():
    text = ("see [a](a.md#x), ![img](img/p.png), [web](https://x.org), [here](#top)\n"
            "`[no](code.md)`\n```\n[no](fence.md)\n```\n")
    assert _relative_links(text) == ["a.md", "img/p.png"]
