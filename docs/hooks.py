"""MkDocs hooks: pages include text that lives elsewhere (README, CHANGELOG, the saved benchmark report,
the registry's table of methods) through ``<!-- khot:... -->`` markers, so that nothing is copied by hand."""

from __future__ import annotations

import pathlib
import posixpath
import re

from mkdocs.exceptions import PluginError

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORT = "report-example/report.md"  # relative to docs/
MARKER = re.compile(r"<!-- khot:(?P<what>[\w-]+)(?: (?P<arg>[^>]*?))? -->")


def _section(text: str, heading: str, source: str) -> str:
    """The body of the section whose heading is ``heading`` (up to the next heading of its level or above)."""
    match = re.search(rf"^(#+) {re.escape(heading)}\s*$", text, re.M)
    if match is None:
        raise PluginError(f"docs: {source} has no heading {heading!r} (a page includes that section)")
    level = len(match[1])
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, match.end())
    return text[match.end() : end.start() if end else len(text)].strip("\n")


def _demote(text: str, levels: int) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * min(6, len(m[1]) + levels) + " ", text, flags=re.M)


def _relink(text: str, source_dir: str, page_dir: str) -> str:
    """Rewrite relative links of text written in ``source_dir`` (docs-relative) for a page in ``page_dir``."""

    def fix(match: re.Match) -> str:
        target = match[2]
        if re.match(r"[a-z]+:|#|/", target):
            return match[0]
        return f"{match[1]}({posixpath.relpath(posixpath.normpath(posixpath.join(source_dir, target)), page_dir or '.')})"

    return re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", fix, text)


def _expand(match: re.Match, page_dir: str) -> str:
    what, arg = match["what"], (match["arg"] or "").strip()
    if what in ("readme-intro", "readme-section"):  # the intro: from the line after the title to the first section
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        body = _section(text, arg, "README.md") if arg else text.split("\n", 1)[1].split("\n## ", 1)[0].strip("\n")
        body = re.sub(r"\]\(docs/", "](", body)  # README links into docs/ are links within the site
        return _relink(body, "", page_dir)
    if what == "changelog":
        return _demote((ROOT / "CHANGELOG.md").read_text(encoding="utf-8").split("\n", 1)[1].strip("\n"), 0)
    if what == "report-section":
        path = ROOT / "docs" / REPORT
        if not path.is_file():
            raise PluginError(f"docs: docs/{REPORT} is missing; a saved `khot bench` run belongs there (khot bench --out docs/report-example)")
        text = path.read_text(encoding="utf-8")
        body = _relink(_section(text, arg, REPORT), posixpath.dirname(REPORT), page_dir)
        return _demote(body, 1)
    if what == "methods-table":
        from khot.relaxed.registry import markdown_table

        return markdown_table()
    if what == "method-references":
        import khot

        return "\n".join(f"- `{m.name}`: {m.reference}." for m in khot.methods())
    if what == "method-functions":  # the functions behind every registered method, with their options
        import khot

        parts = []
        for m in khot.methods():
            parts.append(f"### `{m.name}`\n\n{m.summary[:1].upper()}{m.summary[1:]}. {m.reference}.\n")
            for fn in (m.mask, m.select):
                if fn is not None:
                    parts.append(f"::: {fn.__module__}.{fn.__qualname__}\n    options:\n      heading_level: 4\n")
        return "\n".join(parts)
    raise PluginError(f"docs: unknown marker khot:{what}")


def on_page_markdown(markdown: str, page, config, files) -> str:
    page_dir = posixpath.dirname(page.file.src_uri)
    return MARKER.sub(lambda m: _expand(m, page_dir), markdown)


try:  # the same file is loaded by mkdocstrings as a Griffe extension (see mkdocs.yml)
    import griffe
except ImportError:  # pragma: no cover
    griffe = None

if griffe is not None:
    _DOCTEST = re.compile(r"(?m)^(?P<indent>[ \t]*)>>> .*\n(?:(?P=indent)(?!\s*$).*(?:\n|$))*")

    _SECTION = re.compile(r"[ \t]*[A-Z][\w ]*:[ \t]*$")  # "Example:", "Returns:", ...
    _ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`~?([^`]+)`")

    _ARGS = re.compile(r"([ \t]*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):[ \t]*$")
    _GROUPED = re.compile(r"([ \t]+)(\w+(?:[ \t]*,[ \t]*\w+)+):(.*)$")

    def _split_grouped_args(text: str) -> str:
        """``a, b: what`` in an Args section (parameters documented together) as one entry per name."""
        out, section = [], None
        for line in text.splitlines():
            header = _ARGS.match(line)
            if header:
                section = len(header[1])
            elif section is not None and line.strip() and len(line) - len(line.lstrip()) <= section:
                section = None
            grouped = _GROUPED.match(line) if section is not None else None
            if grouped:
                out += [f"{grouped[1]}{name.strip()}:{grouped[3]}" for name in grouped[2].split(",")]
            else:
                out.append(line)
        return "\n".join(out)

    class DoctestBlocks(griffe.Extension):
        """Render every docstring example (``>>>`` lines and their output) as a code block, also
        outside an "Example:" section, so that example output such as ``[0.1, 0.2]`` is not
        read as Markdown; Sphinx roles (``:func:`name```) become inline code; parameters documented
        together (``a, b: what``) get one entry each."""

        def on_instance(self, *, obj, **kwargs) -> None:
            doc = obj.docstring
            if doc is None:
                return
            doc.value = _split_grouped_args(_ROLE.sub(r"``\1``", doc.value))
            if ">>> " not in doc.value:
                return

            text = doc.value

            def fence(match: re.Match) -> str:
                indent, block = match["indent"], match[0].rstrip("\n")
                before = [line for line in text[: match.start()].splitlines() if line.strip()]
                outer = re.match(r"[ \t]*", before[-1])[0] if before else ""
                if len(outer) < len(indent) and not _SECTION.match(before[-1]):  # a block indented under prose
                    block = re.sub(rf"(?m)^{indent[len(outer):]}", "", block)
                    indent = outer
                return f"{indent}```pycon\n{block}\n{indent}```\n"

            doc.value = _DOCTEST.sub(fence, text)
