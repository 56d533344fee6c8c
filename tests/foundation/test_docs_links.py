"""The metrics contract is a document of this repository, and no document links outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONTRACT = "docs/metrics-contract.md"


def tracked_text_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    files = []
    for name in names:
        path = REPO / name
        if path.suffix in {".md", ".py", ".proto", ".pyi", ".yml", ".yaml", ".json", ".sh", ".toml"}:
            files.append(path)
    return files


def test_the_contract_is_linked_from_the_readme_the_protos_and_the_metrics_page() -> None:
    assert (REPO / CONTRACT).is_file()
    assert f"]({CONTRACT})" in (REPO / "README.md").read_text()
    assert "](metrics-contract.md)" in (REPO / "docs" / "metrics.md").read_text()
    for proto in sorted((REPO / "proto").rglob("*.proto")):
        assert CONTRACT in proto.read_text(), proto.name


def test_no_file_refers_to_documents_outside_the_repository() -> None:
    outside = re.compile(r"\.\./shared|\bMETRICS\.md\b|\bDESIGN\.md\b")
    offenders = [
        f"{p.relative_to(REPO)}:{n}"
        for p in tracked_text_files()
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert not offenders, offenders


def test_relative_markdown_links_resolve_inside_the_repository() -> None:
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for md in [p for p in tracked_text_files() if p.suffix == ".md"]:
        for target in link.findall(md.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            resolved = (md.parent / target).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                broken.append(f"{md.relative_to(REPO)} -> {target}")
    assert not broken, broken
