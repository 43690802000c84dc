"""Leftover markup: stripping HTML tags and entities, and measuring how much of a document is code.

Only real HTML element names count as tags, so Korean text that puts titles in angle brackets
(`<기생충>`, `<a>` is the one exception) and the PII masks (`<|tel|>`) are left alone. Block-level
tags become a newline so that paragraphs survive; inline tags vanish. Entities are decoded after the
tags are gone, so escaped markup (`&lt;b&gt;`) stays visible as text.

`code_share` scores "broken code" documents, the ones that are mostly HTML, Markdown or JS/CSS
fragments: it is the share of non-space characters that sit in markup or in lines that look like
code.
"""

from __future__ import annotations

import html
import re

_INLINE_TAGS = (
    "a abbr audio b bdi bdo big button canvas circle cite code data del dfn em embed font g i iframe "
    "img input ins kbd label link map mark meta meter object option output param path picture "
    "progress q rect s samp select small source span strike strong sub sup svg template textarea "
    "time track tt u var video wbr"
)
_SPACE_TAGS = "td th"
_BLOCK_TAGS = (
    "address article aside base blockquote body br caption center col colgroup datalist dd details "
    "dialog div dl dt fieldset figcaption figure footer form h1 h2 h3 h4 h5 h6 head header hr html "
    "legend li main nav noscript ol optgroup p pre section summary table tbody tfoot thead title tr "
    "ul"
)
_BLOCK = frozenset(_BLOCK_TAGS.split())
_SPACE = frozenset(_SPACE_TAGS.split())
_TAG_NAMES = "|".join(sorted({*_INLINE_TAGS.split(), *_BLOCK, *_SPACE}, key=len, reverse=True))
# An attribute value may hold '>' inside quotes; a quote never spans a line or 500 characters.
# Quoted attribute values hold neither '<' nor '>': every failed attempt then stops at the next '<'.
_TAG = re.compile(
    rf"</?({_TAG_NAMES})(?=[\s/>])(?:[^<>\"']|\"[^\"<>]{{0,500}}\"|'[^'<>]{{0,500}}')*?/?>",
    re.IGNORECASE,
)
# Blocks removed whole: (opener, closer, replacement). Removed by `_cut_blocks` in linear time;
# a lazy `<!--.*?-->` regex is quadratic on many unclosed openers.
_BLOCKS = (
    (re.compile(r"<!--"), re.compile(r"-->"), ""),
    (re.compile(r"<!\[CDATA\["), re.compile(r"\]\]>"), ""),
    (re.compile(r"<\?php", re.IGNORECASE), re.compile(r"\?>"), ""),
    (re.compile(r"<script\b[^<>]{0,2000}>", re.I), re.compile(r"</script\s*>", re.I), "\n"),
    (re.compile(r"<style\b[^<>]{0,2000}>", re.I), re.compile(r"</style\s*>", re.I), "\n"),
)
_DOCTYPE = re.compile(r"<!doctype[^<>]{0,2000}>", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")
_MARKUP_HINT = re.compile(r"[<&]")


def _cut_blocks(text: str, replace: bool = True) -> tuple[str, int]:
    """Removes comments, CDATA, PHP, script and style blocks (with their bodies); an opener with no
    closer after it is left as is. Returns the text and the number of blocks removed."""
    removed = 0
    for opener, closer, replacement in _BLOCKS:
        start = opener.search(text)
        pieces, pos = [], 0
        while start is not None:
            end = closer.search(text, start.end())
            if end is None:
                break  # no later opener can be closed either
            pieces += [text[pos : start.start()], replacement if replace else " "]
            pos = end.end()
            start = opener.search(text, pos)
        if pieces:
            removed += len(pieces) // 2
            text = "".join(pieces) + text[pos:]
    text, n_doctype = _DOCTYPE.subn("", text)
    return text, removed + n_doctype


def _tag_replacement(m: re.Match) -> str:
    name = m[1].lower()
    if name in _BLOCK:
        return "\n"
    return " " if name in _SPACE else ""


def strip_html(text: str) -> tuple[str, int]:
    """Removes script/style blocks, comments and HTML tags, then decodes character entities.

    Returns the new text and the number of removed or decoded pieces. Whitespace left behind is
    for the whitespace rule to tidy.
    """
    if _MARKUP_HINT.search(text) is None:
        return text, 0
    text, n_blocks = _cut_blocks(text)
    text, n_tags = _TAG.subn(_tag_replacement, text)
    text, n_entities = _ENTITY.subn(lambda m: html.unescape(m[0]), text)
    return text, n_blocks + n_tags + n_entities


# Lines that are code as a whole: JS/TS, CSS, PHP/C preprocessor, Markdown fences and table rules.
# Written so that no two quantifiers can share characters: no catastrophic backtracking on any
# line (tests/data/test_markup.py times adversarial input). `_S` never crosses a line end.
_S = r"[ \t]"
_CODE_LINE = re.compile(
    rf"^{_S}*(?:"
    rf"(?:var|let|const){_S}+[A-Za-z_$][\w$]*{_S}*=.*"
    rf"|(?:async{_S}+)?function\b{_S}*[\w$]*{_S}*\(.*"
    rf"|(?:if|for|while|switch|catch){_S}*\(.*\){_S}*\{{?"
    rf"|return\b.*;"
    rf"|(?:import|export){_S}.*(?:from{_S}*['\"].*|;)"
    rf"|[A-Za-z_$][\w$.\[\]'\"]*{_S}*(?:\(.*\)|[-+*/]?=[^=].*){_S}*[;{{]"
    rf"|\}}?{_S}*(?:else|finally|try)\b{_S}*\{{?"
    rf"|[{{}}()\[\];,]+"
    rf"|(?://|/\*|\*/|#include|#define|<\?php|\?>).*"
    rf"|[.#]?[A-Za-z][\w-]*(?:(?:{_S}*[,>+~]{_S}*|{_S}+)[.#:]?[\w-]+)*{_S}*\{{.*"
    rf"|[a-z-]+{_S}*:{_S}*[^;\n]{{1,200}};{_S}*\}}?"
    rf"|```.*|~~~.*"
    rf"|\|?{_S}*:?-{{3,}}:?{_S}*(?:\|{_S}*:?-{{3,}}:?{_S}*)+\|?"
    rf"){_S}*$",
    re.MULTILINE | re.ASCII,
)
_MD_LINK = re.compile(r"!?\[([^\[\]\n]{0,500})\]\([^()\n]{0,2000}\)")
_MD_MARKS = re.compile(r"^[ \t]*(?:#{1,6}|>|[-*+]|\d+\.)[ \t]+|\*\*|__|`|\|", re.MULTILINE)
_CODE_HINT = re.compile(r"[<&{};=|`\[#*/]")
_SPACE_RE = re.compile(r"\s+")
_HANGUL = re.compile(r"[가-힣ㄱ-ㅎㅏ-ㅣ]")


def _code_line_or_prose(m: re.Match) -> str:
    # A line shaped like code whose letters are mostly Hangul is prose (`// 사랑 그 놈....`).
    line = m[0]
    letters = sum(c.isalnum() for c in line)
    return line if 2 * len(_HANGUL.findall(line)) >= letters > 0 else ""


def _visible(text: str) -> int:
    return len(text) - sum(len(m) for m in _SPACE_RE.findall(text))


def code_share(text: str) -> float:
    """Share (0..1) of the non-space characters of `text` that are markup or code: HTML tags,
    comments, script/style blocks and entities, Markdown syntax (link targets, fences, table rules,
    pipes, emphasis and list marks) and whole lines that parse as JS/CSS/PHP statements."""
    total = _visible(text)
    if total == 0 or _CODE_HINT.search(text) is None:
        return 0.0
    prose = _cut_blocks(text, replace=False)[0]
    prose = _TAG.sub(" ", prose)
    prose = _ENTITY.sub(" ", prose)
    prose = _CODE_LINE.sub(_code_line_or_prose, prose)
    prose = _MD_LINK.sub(r" \1 ", prose)
    prose = _MD_MARKS.sub(" ", prose)
    return 1.0 - _visible(prose) / total
