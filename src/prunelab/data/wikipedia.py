"""Plain prose from a MediaWiki XML dump: the default calibration and evaluation text (`enwiki`).

WikiText-like: the paragraphs of each article with links reduced to their text and everything else
that is not running prose dropped (templates, tables, references, files, lists, headings, lines of
fewer than 12 words). Articles alternate between the two splits by position, every `EVAL_EVERY`-th
article for evaluation and the rest for calibration, so the two never share an article.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from pathlib import Path

CONVERSION = 1  # part of the cached text's name: a change to the rules below re-extracts it
EVAL_EVERY = 4
MIN_WORDS = 12
# innermost first, repeated until none is left: templates and tables nest
_NESTED = (re.compile(r"\{\{[^{}]*\}\}"), re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S))
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_NAMESPACED = re.compile(r"^\s*:?\s*[\w -]+:")  # File:, Category:, interlanguage links: not prose
_NOT_PROSE = ("*", "#", ":", ";", "|", "!", "=", "{", "}")


def split_articles(dump: Path, role: str) -> str:
    """The articles of `dump` for `role` ("calib" or "eval"), paragraphs and articles joined by blank lines."""
    chosen = [a for i, a in enumerate(articles(dump)) if (i % EVAL_EVERY == EVAL_EVERY - 1) == (role == "eval")]
    return "\n\n".join(chosen)


def articles(dump: Path) -> list[str]:
    """The prose of each main-namespace article of a (bz2) MediaWiki XML dump, redirects skipped."""
    found = []
    with (bz2.open(dump) if dump.suffix == ".bz2" else open(dump, "rb")) as f:
        for _, element in ET.iterparse(f):
            if not element.tag.endswith("}page"):
                continue
            ns = element.tag[: -len("page")]  # the export schema's namespace, versioned
            if element.findtext(ns + "ns") == "0" and element.find(ns + "redirect") is None:
                prose = "\n\n".join(paragraphs(element.findtext(f"{ns}revision/{ns}text") or ""))
                if prose:
                    found.append(prose)
            element.clear()
    return found


def paragraphs(wikitext: str) -> list[str]:
    """The running-prose paragraphs of one article's wikitext."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", "", text, flags=re.S | re.I)
    for pattern in _NESTED:
        text = _until_stable(pattern, "", text)
    text = _until_stable(_LINK, _link_text, text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"'{2,}", "", text)  # bold, italics
    text = html.unescape(re.sub(r"<[^>]+>", "", text))
    lines = (re.sub(r"\s+", " ", line).strip() for line in text.splitlines())
    return [line for line in lines if len(line.split()) >= MIN_WORDS and not line.startswith(_NOT_PROSE)]


def _until_stable(pattern: re.Pattern, replacement, text: str) -> str:
    count = 1
    while count:
        text, count = pattern.subn(replacement, text)
    return text


def _link_text(match: re.Match) -> str:
    target, *label = match.group(1).split("|")
    if _NAMESPACED.match(target):
        return ""
    return label[-1] if label else target
