"""MkDocs hook: relative links in the example notebooks' markdown cells (``../guides/x.md``,
``../verification/README.md#anchor``, ``other.ipynb``) point at the pages they name on the
site. mkdocs-jupyter renders notebooks with nbconvert, which leaves links as written
(danielfrg/mkdocs-jupyter#157), so they would resolve against the page's directory URL."""
from __future__ import annotations

import posixpath
import re

from mkdocs.utils import get_relative_url

_files = None
LINK = re.compile(r'href="(?![a-z]+:|/|#)([^"#]+\.(?:md|ipynb))(#[^"]*)?"')


def on_files(files, config):
    global _files
    _files = files
    return files


def on_post_page(output: str, page, config) -> str:
    if not page.file.src_uri.endswith(".ipynb"):
        return output

    def resolve(match):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(page.file.src_uri), match[1]))
        file = _files.get_file_from_path(target)
        if file is None or file is page.file:  # unknown, or the notebook itself (its download): as written
            return match[0]
        return f'href="{get_relative_url(file.url, page.url)}{match[2] or ""}"'

    return LINK.sub(resolve, output)
