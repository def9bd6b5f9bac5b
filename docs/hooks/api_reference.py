"""MkDocs hook: the API reference pages, generated from ``extra.api_modules`` in mkdocs.yml.

Each listed module gets a page ``api/<module>.md`` rendered by mkdocstrings from its
docstrings, and a nav entry under "API reference"; ``api/index.md`` lists every name of
``lottojax.__all__`` with a link to where it is documented. Adding a module to the
reference is one line in mkdocs.yml (``tests/test_docs.py`` flags modules left out).
"""
from __future__ import annotations

import functools
import pathlib
import re

import griffe
from mkdocs.structure.files import File

SRC = pathlib.Path(__file__).resolve().parents[2] / "src"  # the package's sources, from any working directory
NAV_TITLE = "API reference"
# Sphinx roles in docstrings (:func:`name`) as rendered by Markdown: a role, then code.
SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):<code>(~?)([\w.]+)</code>")


@functools.cache
def load(package: str):
    return griffe.load(package, search_paths=[str(SRC)])


def api_modules(config) -> list[str]:
    return list(config["extra"]["api_modules"])


def page_path(module: str) -> str:
    return f"api/{module}.md"


def module_page(module: str) -> str:
    package = load(module.split(".")[0])
    obj = package if module == package.path else package[module.split(".", 1)[1]]
    options = ""
    if obj.is_package:  # its own names only: what it re-exports is documented where it is defined
        own = sorted(n for n, m in obj.members.items() if not (m.is_alias or m.is_module or n.startswith("_")))
        options = f"    options:\n      members: {own or 'false'}\n".replace("'", '"')
    return f"# `{module}`\n\n::: {module}\n{options}"


def documented_path(parent, name: str) -> str:
    """Where ``parent.name`` is documented: an imported name (even one that shadows a
    submodule, as ``from lottojax.rewind import rewind`` does) where it is defined."""
    if name in parent.imports:
        return parent.imports[name]
    member = parent[name]
    return member.target_path if member.is_alias else member.path


def summary(obj) -> str:
    """The first sentence of an object's docstring, on one line, for a table cell."""
    text = obj.docstring.value if obj.docstring else ""
    first = " ".join(text.split("\n\n", 1)[0].split())
    return first.split(". ", 1)[0].rstrip(".").replace("|", "\\|")


def index_page(modules: list[str]) -> str:
    """The overview: every name of ``lottojax.__all__`` linked to its documentation."""
    package = load("lottojax")
    public = sorted(package.exports or [], key=str.lower)
    rows = []
    for name in public:
        target = documented_path(package, name)
        module = target.rsplit(".", 1)[0]
        rows.append(f"| [`{name}`][{target}] | {summary(package[target.split('.', 1)[1]])} | [`{module}`]({module}.md) |")
    listing = "\n".join(f"- [`{m}`]({m}.md)" for m in modules)
    return "\n".join([
        "# API reference",
        "",
        "Generated from the docstrings. `import lottojax as lj` gives the core; the modules",
        "below hold the rest (training, IMP, the experiment layer, models, data).",
        "",
        "## `lottojax`: the names it exports",
        "",
        "| name | what it is | documented in |",
        "|---|---|---|",
        *rows,
        "",
        "## Modules",
        "",
        listing,
        "",
    ])


def on_config(config):
    entries = [{"Overview": "api/index.md"}] + [{m: page_path(m)} for m in api_modules(config)]
    for i, item in enumerate(config["nav"]):
        if isinstance(item, dict) and NAV_TITLE in item:
            config["nav"][i] = {NAV_TITLE: entries}
    return config


def on_files(files, config):
    modules = api_modules(config)
    files.append(File.generated(config, "api/index.md", content=index_page(modules)))
    for module in modules:
        files.append(File.generated(config, page_path(module), content=module_page(module)))
    return files


def on_page_content(html, page, config, files):
    """Sphinx roles become cross-references (plain code where the target is not documented);
    a bare name on a module's page is looked up in that module first."""
    module = page.file.src_uri.removeprefix("api/").removesuffix(".md") if page.file.src_uri.startswith("api/") else ""

    def link(match):
        short, name = match[1], match[2]
        identifier = name if "." in name or not module else f"{module}.{name}"
        title = name.rsplit(".", 1)[-1] if short else name
        return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

    return SPHINX_ROLE.sub(link, html)
