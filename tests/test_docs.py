"""The README and the docs site: the README stays a ten-minute read whose every link resolves,
and `mkdocs build --strict` builds the site (a broken link, a missing page or an unknown anchor
fails it)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_readme_is_short_and_every_link_resolves():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 220
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links, "the README links to its docs"
    for link in links:
        if not link.startswith(("http://", "https://")):
            assert (ROOT / link).exists(), link
    for page in re.findall(r"docs/([a-z-]+\.md)", text):  # every page it names is in the site
        assert page in (ROOT / "mkdocs.yml").read_text(), page


def test_the_docs_site_builds_strictly(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                        str(tmp_path / "site"), "--config-file", str(ROOT / "mkdocs.yml")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "site" / "pbt" / "index.html").is_file()


def test_the_layout_page_names_every_module():
    """docs/layout.md is the map of the code: each module of search/ and trainer/ is on it."""
    layout = (ROOT / "docs" / "layout.md").read_text()
    missing = [str(p.relative_to(ROOT)) for package in ("search", "trainer")
               for p in sorted((ROOT / package).rglob("*.py"))
               if p.name not in ("__init__.py", "__main__.py") and p.name not in layout]
    assert not missing, missing


def _subcommands() -> dict:
    import argparse

    from search.cli import build_parser

    actions = build_parser()._actions
    return next(a for a in actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_of_every_command_is_documented_under_it():
    text = (ROOT / "docs" / "commands.md").read_text()
    sections = dict(re.findall(r"^### search (\S+)\n(.*?)(?=^### |\Z)", text, re.S | re.M))
    missing = []
    for name, parser in _subcommands().items():
        assert name in sections, f"docs/commands.md has no section '### search {name}'"
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help") and not re.search(
                        rf"`{re.escape(flag)}(?:[ `])", sections[name]):
                    missing.append(f"search {name} {flag}")
    assert not missing, missing


def test_the_readme_command_summary_names_only_real_flags():
    text = (ROOT / "README.md").read_text()
    block = text.split("## Every command", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    commands, wrong, current = _subcommands(), [], None
    for line in block.splitlines():
        words = line.split()
        if words[:1] == ["search"]:
            current = commands[words[1]]
        if current is None:
            continue
        known = {f for a in current._actions for f in a.option_strings}
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", line):
            if flag not in known:
                wrong.append(f"{line.strip()[:40]}…: {flag}")
    assert not wrong, wrong


NOTES_COLUMNS = {"optimizer": "optimiser", "batch_size": "batch size", "momentum": "β1 / momentum",
                 "weight_decay": "weight decay", "lr": "lr", "t_max": "T_max",
                 "augment": "augmentation"}
NOTES_STUDIES = ("seed-adamw", "sgdm", "seed-augmentation", "seed-final")


def notes_table(study: str) -> str:
    """The Markdown table of a study file's fixed trials: the notes' rows as the study carries
    them (label, settings, the reported validation accuracy)."""
    from search.inputs.studyfile import load_study_file

    sf = load_study_file(study)
    rows = sf.fixed_trials
    keys = [k for k in NOTES_COLUMNS if any(k in r.params for r in rows)]
    lines = ["| row | " + " | ".join(NOTES_COLUMNS[k] for k in keys) + " | reported val acc |",
             "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        acc = "–" if r.reported is None else f"{100 * r.reported:.2f} %"
        lines.append(f"| {r.label} | " + " | ".join(f"{r.params.get(k, '')}" for k in keys)
                     + f" | {acc} |")
    return "\n".join(lines)


def test_the_notes_tables_are_the_study_files_rows():
    """docs/hand-tuned-study.md shows the notes' tables as the study files that reproduce them
    carry them: every row, its settings and reported accuracy, so neither drifts alone."""
    page = (ROOT / "docs" / "hand-tuned-study.md").read_text()
    for study in NOTES_STUDIES:
        assert notes_table(study) in page, study
