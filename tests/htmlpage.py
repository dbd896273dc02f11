"""Reading an HTML report back as a test needs to: the elements with ids, the text of each plot's SVG,
the tables' rows. Built on the standard library's HTML parser, so it reads the file we write and the DOM
Chromium dumps alike."""

from __future__ import annotations

from collections import Counter
from html.parser import HTMLParser

# Elements without an end tag in HTML: never on the open-element stack.
_VOID = {"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "embed", "source", "wbr"}


class Page(HTMLParser):
    """``ids``: every id (with repeats); ``texts[id]``: the text inside the element with that id, in
    order (one string per text node); ``attrs[id]``: its attributes; ``tags``: every tag name seen."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: Counter[str] = Counter()
        self.texts: dict[str, list[str]] = {}
        self.attrs: dict[str, dict[str, str]] = {}
        self.tags: Counter[str] = Counter()
        self._open: list[tuple[str, str | None]] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        named = dict((k, v or "") for k, v in attrs)
        ident = named.get("id")
        if ident:
            self.ids[ident] += 1
            self.texts.setdefault(ident, [])
            self.attrs[ident] = named
        if tag not in _VOID:
            self._open.append((tag, ident))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self._open.pop()

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth][0] == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        if not data.strip():
            return
        for _, ident in self._open:
            if ident:
                self.texts[ident].append(data.strip())

    def text(self, ident: str) -> str:
        return " ".join(self.texts.get(ident, []))
