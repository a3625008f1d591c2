"""MkDocs hook: render the Sphinx cross-reference roles of deqdiff's docstrings as code.

The docstrings use reStructuredText roles (``:func:`deqdiff.fixed_point```,
``:class:`~deqdiff.engine.warm_start.WarmStart```) that Markdown leaves as
``:func:<code>deqdiff.fixed_point</code>``. This hook drops the role prefix and, as Sphinx does
for a leading ``~``, keeps only the last component of the name.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    tilde, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_code, html)
