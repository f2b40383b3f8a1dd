"""The README stays short and true: its reading-order line counts match the files, it fits in 15,000 bytes,
its relative links resolve, and it indexes every page of docs/."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
READING_PATH = ("data.py", "rollout.py", "teacher.py", "loss.py", "train.py")  # the paper, in reading order
ROW = re.compile(r"^\| `([\w/]+\.py)` \| ([\d,]+) \|", re.M)  # "| `data.py` | 170 | what it holds |"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def line_count(path: Path) -> int:
    """What `wc -l` prints: the number of newline characters."""
    return path.read_bytes().count(b"\n")


def readme_rows() -> dict[str, int]:
    return {name: int(n.replace(",", "")) for name, n in ROW.findall(README.read_text(encoding="utf-8"))}


def test_reading_order_counts_match_the_files():
    rows = readme_rows()
    assert list(rows)[:len(READING_PATH)] == list(READING_PATH), f"reading-order rows: {list(rows)}"
    assert {"evaluate.py", "diagnose.py"} <= set(rows)
    wrong = {name: (n, line_count(ROOT / name)) for name, n in rows.items() if n != line_count(ROOT / name)}
    assert not wrong, "README.md reading order: `file` (README count, wc -l) " + ", ".join(
        f"{k} ({a}, {b})" for k, (a, b) in wrong.items())


def test_reading_path_total_matches_the_files():
    m = re.search(r"reading path is ([\d,]+) lines in all", README.read_text(encoding="utf-8"))
    assert m, "README.md should say 'The reading path is N lines in all'"
    assert int(m.group(1).replace(",", "")) == sum(line_count(ROOT / f) for f in READING_PATH)


def test_readme_fits_in_15000_bytes():
    assert README.stat().st_size <= 15_000, f"README.md is {README.stat().st_size} bytes (limit 15,000)"


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation other than - and _ dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # no headings in code blocks
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_relative_links_resolve():
    text = re.sub(r"```.*?```", "", README.read_text(encoding="utf-8"), flags=re.S)
    links = [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # skip https:, mailto:
    assert links, "no relative links found: the link pattern is broken"
    broken = []
    for target in links:
        file, _, anchor = target.partition("#")
        path = README if not file else (README.parent / file)
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, "README.md links: " + ", ".join(broken)


def test_readme_indexes_every_doc():
    text = README.read_text(encoding="utf-8")
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in text]
    assert not missing, f"docs/ pages the README's documentation index does not link: {missing}"


def test_slug_and_row_patterns():
    assert slug("bench/mini_repro.py with its defaults (2026-12-02, third session)") == \
        "benchmini_repropy-with-its-defaults-2026-12-02-third-session"
    assert ROW.findall("| `data.py` | 170 | what it holds |\n| file | lines | what |") == [("data.py", "170")]
