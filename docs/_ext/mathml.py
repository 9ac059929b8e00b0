"""Server-side math for the HTML builder: LaTeX → MathML Core at build time, no JavaScript.

Registers the HTML math renderer ``"mathml"`` (select it with ``html_math_renderer = "mathml"``).
Every ``:math:`` role, ``.. math::`` directive and MyST ``$…$``/``$$…$$`` block is converted by
``math_core`` (Rust, abi3 wheels on PyPI) into MathML Core, which Chromium (≥ 109), Firefox and Safari
render natively. The built pages load nothing from the network, and LaTeX the converter does not know
is a build warning (an error under ``-W``) at the source line, not red text in a reader's browser.
"""

from __future__ import annotations

import html
from typing import Any

from docutils import nodes
from math_core import LatexError, LatexToMathML
from sphinx.locale import _
from sphinx.util import logging
from sphinx.util.math import get_node_equation_number

logger = logging.getLogger(__name__)

# ``annotation=True`` keeps the LaTeX source in <annotation> (copy/paste, screen readers)
_CONVERTER = LatexToMathML(annotation=True, fancy_error=False)


def _convert(latex: str, node: nodes.Node, *, display: bool) -> str:
    try:
        return _CONVERTER.convert_with_local_state(latex, displaystyle=display)
    except LatexError as err:
        logger.warning("cannot render math %r: %s", latex, err, location=node, type="math",
                       subtype="mathml")
        return f'<code class="math-error">{html.escape(latex)}</code>'


def _wrap_display(latex: str) -> str:
    # as sphinx.ext.mathjax: paragraphs are separate equations, a part with ``\\`` is aligned on ``&``
    parts = [part.strip() for part in latex.split("\n\n") if part.strip()]
    rows = [rf"\begin{{aligned}}{part}\end{{aligned}}" if r"\\" in part else part for part in parts]
    if len(rows) == 1:
        return rows[0]
    return r"\begin{gathered}" + r"\\".join(rows) + r"\end{gathered}"


def visit_math(self: Any, node: nodes.math) -> None:
    self.body.append(self.starttag(node, "span", "", CLASS="math notranslate"))
    self.body.append(_convert(node.astext(), node, display=False))
    self.body.append("</span>")
    raise nodes.SkipNode


def visit_displaymath(self: Any, node: nodes.math_block) -> None:
    self.body.append(self.starttag(node, "div", CLASS="math notranslate"))
    if node["number"]:
        number = get_node_equation_number(self, node)
        self.body.append(f'<span class="eqno">({number})')
        self.add_permalink_ref(node, _("Link to this equation"))
        self.body.append("</span>")
    latex = node.astext()
    if not node.get("no-wrap", node.get("nowrap", False)):
        latex = _wrap_display(latex)
    self.body.append(_convert(latex, node, display=True))
    self.body.append("</div>\n")
    raise nodes.SkipNode


def setup(app: Any) -> dict[str, Any]:
    app.add_html_math_renderer("mathml", inline_renderers=(visit_math, None),
                               block_renderers=(visit_displaymath, None))
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
