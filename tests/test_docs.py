"""The project's own documents: docs/ holds what the code cites, and the package claims only what it ships."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from adaptor_peft.adaptors import AdaptorConfig

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
SOURCES = [p for folder in ("adaptor_peft", "tests", "benchmarks", "examples") for p in (ROOT / folder).rglob("*.py")]


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of the headings of ``markdown``."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_cited_sections_of_the_docs_exist():
    cited = {(m[0], m[1]) for p in SOURCES for m in re.findall(r"docs/(\w+\.md)#([\w-]+)", p.read_text())}
    assert ("method.md", "vtab-1k") in cited
    for name, anchor in cited:
        assert anchor in anchors((ROOT / "docs" / name).read_text()), f"docs/{name}#{anchor}"


def test_no_document_outside_the_project_is_cited():
    brief = "DESIGN" + ".md"  # spelt apart so that this file does not cite it either
    citing = [p.name for p in [*SOURCES, *(ROOT / "docs").rglob("*")] if p.is_file() and brief in p.read_text()]
    assert not citing
    assert "shared/" not in METHOD.read_text()


def test_every_adaptor_config_field_is_documented_with_its_default():
    rows = {m[0]: m[1] for m in re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", METHOD.read_text(), flags=re.MULTILINE)}
    for field in dataclasses.fields(AdaptorConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert rows.get(field.name) == str(default), field.name


def test_every_optional_dependency_is_imported_somewhere():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    code = "\n".join(p.read_text() for p in SOURCES if "tests" not in p.parts)
    for extra, requirements in extras.items():
        if extra == "dev":  # tools, run rather than imported
            continue
        for requirement in requirements:
            module = re.match(r"[\w-]+", requirement).group().replace("-", "_")
            assert re.search(rf"(import|from) {module}\b|find_spec\(\"{module}\"\)", code), f"[{extra}] {requirement}"


def test_the_extending_guide_runs():
    """docs/extending.md's example registers a method and prepares a model with it, as written."""
    from adaptor_peft.adaptors import METHODS

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "extending.md").read_text(), re.S)
    namespace: dict = {}
    try:
        exec(compile("\n".join(blocks), "docs/extending.md", "exec"), namespace)
        model = namespace["model"]
        assert model.peft_method.name == "lora_out_proj"
        trained = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
        assert trained and all(".out_proj" in n for n in trained)
    finally:
        METHODS.pop("lora_out_proj", None)


def test_the_readmes_measured_rows_are_copied_from_the_results_files():
    """Words follow numbers: a README table row of per-seed spreads (``mean ± sd``) for a suite task or mean
    appears, cell for cell, in a file of ``benchmarks/results/``, so the README cannot drift from a rerun."""
    from adaptor_peft.data.synthetic import TASKS

    results = "\n".join(p.read_text() for p in (ROOT / "benchmarks" / "results").glob("*.md"))
    labels = "|".join([*TASKS, r"\*\*[^|*]+\*\*"])
    rows = re.findall(rf"^\| (?:{labels}) \|[^\n]* ± [^\n]*\|$", (ROOT / "README.md").read_text(), flags=re.MULTILINE)
    assert len(rows) >= 8
    missing = [row for row in rows if row not in results]
    assert not missing, missing
