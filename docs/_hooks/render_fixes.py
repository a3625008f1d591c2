"""MkDocs hook: two renderings Markdown gets wrong in deqdiff's docs.

* The docstrings use reStructuredText roles (``:func:`deqdiff.fixed_point```,
  ``:class:`~deqdiff.engine.warm_start.WarmStart```) that Markdown leaves as
  ``:func:<code>deqdiff.fixed_point</code>``. The role prefix is dropped and, as Sphinx does for
  a leading ``~``, only the last component of the name is kept.
* A pipe inside a code span in a table cell must be written ``\\|`` (GitHub's table syntax);
  Python-Markdown keeps the backslash in the code, so it is removed in table cells.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|mod|class|meth|attr|data|exc|obj):<code>(~?)([^<]*)</code>")
_CELL = re.compile(r"<td>.*?</td>", flags=re.S)


def _code(match: re.Match) -> str:
    tilde, name = match.groups()
    return f"<code>{name.rsplit('.', 1)[-1] if tilde else name}</code>"


def on_page_content(html: str, **kwargs) -> str:
    html = _ROLE.sub(_code, html)
    return _CELL.sub(lambda m: m.group(0).replace("\\|", "|"), html)
