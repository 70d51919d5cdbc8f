"""MkDocs hook: the package's docstrings use Sphinx roles (:func:`name`), which Markdown renders as ':func:' plus
code; drop the role so the API pages show just the code span."""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):(?=<code>)")


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub("", html)
