"""The text of simple PDFs, read from their content streams without PDFium's page machinery.

PDFium loads each page (content parsing, font programs, glyph maps, a text page) to give
its text: about 1.5 ms for a one-page letter, most of the cost of checking an upload. Many
documents that reach the shared record are generated, not scanned or typeset: standard
fonts, one string per line. For those this module reads the text straight from the page
content, and :func:`simple_text` says ``None`` for anything else, which PDFium then reads.

It answers only when every part of the file it needs is of the plainest kind:

* a classic cross-reference table (no cross-reference stream, no object stream, no
  encryption, no incremental update), each object found at its offset with its header;
* pages reached from the catalog through ``/Pages`` and ``/Kids`` (at most ``max_pages``,
  the same count as the caller's structure check);
* content streams unfiltered or with ``/FlateDecode`` and ``/ASCII85Decode`` (no
  predictor), 1 MiB of them at most once inflated;
* fonts that are simple (``Type1``, ``MMType1``, ``TrueType``) with no ``/ToUnicode`` and
  no ``/Differences``, encoded ``WinAnsiEncoding`` or ``MacRomanEncoding``, or a standard
  Latin font (Helvetica, Times, Courier) in its standard encoding for ASCII text;
* no form XObject (text may hide in one) and no inline image.

Text comes from the show operators (``Tj``, ``TJ``, ``'``, ``"``); a line move, a new text
object or a wide ``TJ`` gap is a space. The caller still runs every other check (type,
active content, trailing data, PDFium opening the file and counting its pages).
"""

from __future__ import annotations

import re
import zlib
from base64 import a85decode
from typing import Any

# Bytes of content streams per document read here (generated letters hold a few KB a page); beyond,
# PDFium reads the file: the token list of a huge stream would cost far more memory than PDFium.
MAX_INFLATED = 1024 * 1024
_WS = b" \t\r\n\f\x00"
# Every token in one pass (findall, in C): a literal string (parentheses nested one level
# deep at most: deeper, a lone "(" is left and the file goes to PDFium), a dictionary mark, a
# hex string, a name, a number or keyword, an array mark, a comment, or a byte that is none.
_TOKEN_RE = re.compile(
    rb"\((?:[^()\\]++|\\.|\((?:[^()\\]++|\\.)*+\))*+\)|<<|>>|<[0-9A-Fa-f \t\r\n\f]*>"
    rb"|/[^ \t\r\n\f\x00()<>\[\]{}/%]*|[^ \t\r\n\f\x00()<>\[\]{}/%]+|[\[\]]|%[^\r\n]*|[^ \t\r\n\f]", re.DOTALL)
_NUMBER_START = frozenset(b"+-.0123456789")
_OPERAND_START = frozenset(b"+-.0123456789/")  # numbers and names
_STRING_START = frozenset(b"(<")
_NOT_OPERATOR = frozenset(b"()<>{}[]")
_ESCAPE_RE = re.compile(rb"\\([0-7]{1,3}|\r\n|.)", re.DOTALL)
_XREF_ENTRY_RE = re.compile(rb"(\d{10}) (\d{5}) ([nf])")
_OBJ_HEAD_RE = re.compile(rb"(\d+)\s+(\d+)\s+obj\b")
_SUBSECTION_RE = re.compile(rb"\s*(\d+) (\d+)[ \t]*\r?\n?")
_TRAILER_RE = re.compile(rb"\s*trailer")
_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("f"): b"\f", ord("("): b"(",
            ord(")"): b")", ord("\\"): b"\\"}
STANDARD_LATIN = re.compile(r"^(Helvetica|Times-Roman|Times-Bold|Times-Italic|Times-BoldItalic|Courier)(-[A-Za-z]+)?$")
ENCODINGS = {"WinAnsiEncoding": "cp1252", "MacRomanEncoding": "mac_roman"}


class Unsupported(Exception):
    """Not a PDF this module reads: PDFium does."""


class Name(str):
    """A PDF name (``/Font`` is ``Name("Font")``)."""


class Ref(tuple):
    """An indirect reference ``n g R``."""


def _unescape(m: re.Match) -> bytes:
    e = m.group(1)
    if e[0] in b"01234567":
        return bytes([int(e, 8) & 0xFF])
    if e in (b"\r\n", b"\r", b"\n"):
        return b""
    return _ESCAPES.get(e[0], e)


def _string(raw: bytes) -> bytes:
    """The bytes of a literal ``(...)`` or hex ``<...>`` string token."""
    if raw[0] == 0x3C:
        h = re.sub(rb"[ \t\r\n\f]", b"", raw[1:-1])
        return bytes.fromhex((h + b"0" * (len(h) % 2)).decode())
    body = raw[1:-1]
    return _ESCAPE_RE.sub(_unescape, body) if b"\\" in body else body


def _kind(tok: bytes) -> str:
    """s(tring), n(ame), o (number or keyword), [, ], <<, >>, c(omment); anything else is refused."""
    c = tok[0]
    if c == 0x28:  # (
        if len(tok) > 1:
            return "s"
    elif c == 0x3C:  # <
        if tok == b"<<":
            return "<<"
        if len(tok) > 1:
            return "s"
    elif c == 0x3E:  # >
        if tok == b">>":
            return ">>"
    elif c == 0x2F:
        return "n"
    elif c == 0x5B:
        return "["
    elif c == 0x5D:
        return "]"
    elif c == 0x25:
        return "c"
    elif c not in b")[]{}":
        return "o"
    raise Unsupported(f"unexpected {tok[:10]!r}")


def _parse(toks: list[bytes], i: int) -> tuple[object, int]:
    """The object starting at ``toks[i]`` and the index after it."""
    tok = toks[i]
    kind = _kind(tok)
    if kind == "o":
        if tok[0] in _NUMBER_START:
            return (float(tok) if b"." in tok else int(tok)), i + 1
        if tok in (b"true", b"false"):
            return tok == b"true", i + 1
        if tok == b"null":
            return None, i + 1
        raise Unsupported(f"unexpected {tok[:20]!r}")
    if kind == "n":
        return Name(_unescape_name(tok[1:])), i + 1
    if kind == "s":
        return _string(tok), i + 1
    if kind in ("[", "<<"):
        close = b"]" if kind == "[" else b">>"
        items: list = []
        i += 1
        while True:
            if i >= len(toks):
                raise Unsupported("unterminated")
            t = toks[i]
            if t == close:
                i += 1
                break
            if t == b"R":
                if len(items) < 2 or type(items[-1]) is not int or type(items[-2]) is not int:
                    raise Unsupported("stray R")
                g, n_ = items.pop(), items.pop()
                items.append(Ref((n_, g)))
                i += 1
                continue
            if t[0] == 0x25:
                i += 1
                continue
            obj, i = _parse(toks, i)
            items.append(obj)
        if kind == "[":
            return items, i
        if len(items) % 2:
            raise Unsupported("odd dictionary")
        d: dict = {}
        for k, v in zip(items[::2], items[1::2], strict=True):
            if not isinstance(k, Name):
                raise Unsupported("dictionary key")
            d[str(k)] = v
        return d, i
    raise Unsupported(f"unexpected {tok[:20]!r}")


def _unescape_name(raw: bytes) -> str:
    if b"#" in raw:
        raw = re.sub(rb"#([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)
    return raw.decode("latin-1")


class _File:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offsets: dict[int, tuple[int, int]] = {}
        self.cache: dict[int, object] = {}
        self.inflated = 0
        at = data.rfind(b"startxref")
        if at < 0:
            raise Unsupported("no startxref")
        m = re.match(rb"startxref\s+(\d+)", data[at:at + 40])
        if not m:
            raise Unsupported("startxref")
        pos = int(m.group(1))
        if data[pos:pos + 4] != b"xref":
            raise Unsupported("not a classic xref table")
        pos += 4
        while True:
            m = _SUBSECTION_RE.match(data, pos)
            if not m:
                break
            start, count = int(m.group(1)), int(m.group(2))
            pos = m.end()
            for k in range(count):
                e = _XREF_ENTRY_RE.match(data, pos)
                if not e:
                    raise Unsupported("xref entry")
                if e.group(3) == b"n":
                    self.offsets[start + k] = (int(e.group(1)), int(e.group(2)))
                pos = e.end()
                while pos < len(data) and data[pos] in b" \r\n":
                    pos += 1
        m = _TRAILER_RE.match(data, pos)
        if not m:
            raise Unsupported("no trailer")
        end = data.find(b"startxref", m.end())
        self.trailer, _ = _parse(_TOKEN_RE.findall(data, m.end(), end), 0)
        if not isinstance(self.trailer, dict) or "Prev" in self.trailer or "XRefStm" in self.trailer or "Encrypt" in self.trailer:
            raise Unsupported("trailer")

    def get(self, obj: object) -> object:
        """``obj``, or the object it refers to."""
        if not isinstance(obj, Ref):
            return obj
        num, gen = obj
        if num in self.cache:
            return self.cache[num]
        where = self.offsets.get(num)
        if where is None or where[1] != gen:
            raise Unsupported("dangling reference")
        m = _OBJ_HEAD_RE.match(self.data, where[0])
        if not m or int(m.group(1)) != num or int(m.group(2)) != gen:
            raise Unsupported("object not at its offset")
        data = self.data
        stop = data.find(b"endobj", m.end())
        if stop < 0:
            raise Unsupported("endobj")
        stream = data.find(b"stream", m.end(), stop)
        toks = _TOKEN_RE.findall(data, m.end(), stream if stream >= 0 else stop)
        value, i = _parse(toks, 0)
        if i != len(toks):
            raise Unsupported("more than one object")
        if stream >= 0:
            if not isinstance(value, dict):
                raise Unsupported("stream without dictionary")
            start = stream + 6
            if data[start:start + 2] == b"\r\n":
                start += 2
            elif data[start:start + 1] == b"\n":
                start += 1
            else:
                raise Unsupported("stream keyword")
            length = self.get(value.get("Length"))
            if type(length) is not int or length < 0:
                raise Unsupported("stream length")
            if not data[start + length:start + length + 40].lstrip(_WS).startswith(b"endstream"):
                raise Unsupported("stream length does not reach endstream")
            value = (value, data[start:start + length])
        self.cache[num] = value
        return value

    def dict_of(self, obj: object) -> dict:
        v = self.get(obj)
        if not isinstance(v, dict):
            raise Unsupported("not a dictionary")
        return v

    def stream(self, obj: object) -> bytes:
        v = self.get(obj)
        if not isinstance(v, tuple):
            raise Unsupported("not a stream")
        head, raw = v
        filters = self.get(head.get("Filter"))
        filters = [filters] if isinstance(filters, Name) else list(filters or [])
        if head.get("DecodeParms") is not None:
            raise Unsupported("decode parameters")
        data = raw
        for f in filters:
            f = self.get(f)
            if f in ("ASCII85Decode", "A85"):
                body = data.strip(_WS)
                body = body[2:] if body.startswith(b"<~") else body
                data = a85decode(body[:-2] if body.endswith(b"~>") else body, adobe=False, ignorechars=_WS)
            elif f in ("FlateDecode", "Fl"):
                d = zlib.decompressobj()
                data = d.decompress(data, MAX_INFLATED - self.inflated + 1)
                if d.unconsumed_tail:
                    raise Unsupported("content too large")
            else:
                raise Unsupported(f"filter {f}")
        self.inflated += len(data)
        if self.inflated > MAX_INFLATED:
            raise Unsupported("content too large")
        return data


def _pages(f: _File, max_pages: int) -> list[tuple[dict, dict]]:
    """(page, resources) in order, resources inherited from the tree."""
    root = f.dict_of(f.trailer.get("Root"))
    out: list[tuple[dict, dict]] = []
    seen: set[int] = set()

    def walk(ref: object, inherited: object, depth: int) -> None:
        if depth > 32 or len(out) >= max_pages:
            return
        if isinstance(ref, Ref):
            if ref[0] in seen:
                raise Unsupported("page tree loop")
            seen.add(ref[0])
        node = f.dict_of(ref)
        res = node.get("Resources", inherited)
        if node.get("Type") == "Pages" or "Kids" in node:
            kids = f.get(node.get("Kids"))
            if not isinstance(kids, list):
                raise Unsupported("kids")
            for k in kids:
                walk(k, res, depth + 1)
        elif node.get("Type") == "Page":
            out.append((node, f.dict_of(res) if res is not None else {}))
        else:
            raise Unsupported("page tree node")

    walk(root.get("Pages"), None, 0)
    return out


def _decoder(f: _File, font_ref: object):  # type: ignore[no-untyped-def]
    font = f.dict_of(font_ref)
    if font.get("Subtype") not in ("Type1", "MMType1", "TrueType") or "ToUnicode" in font:
        raise Unsupported("font kind")
    enc = f.get(font.get("Encoding"))
    if isinstance(enc, Name) and str(enc) in ENCODINGS:
        codec = ENCODINGS[str(enc)]
        return lambda b: b.decode(codec, "replace")
    base = str(font.get("BaseFont") or "")
    if enc is None and font.get("Subtype") != "TrueType" and STANDARD_LATIN.match(base):
        def standard(b: bytes) -> str:
            if max(b, default=0) >= 0x80:
                raise Unsupported("standard encoding beyond ASCII")
            return b.decode("ascii").replace("'", "\u2019").replace("`", "\u2018")
        return standard
    raise Unsupported("encoding")


def _page_text(f: _File, page: dict, resources: dict, out: list[str]) -> None:
    contents = f.get(page.get("Contents"))
    parts = contents if isinstance(contents, list) else ([page.get("Contents")] if contents is not None else [])
    data = b"\n".join(f.stream(c) for c in parts)
    fonts = f.get(resources.get("Font")) or {}
    xobjects = f.get(resources.get("XObject")) or {}
    if not isinstance(fonts, dict) or not isinstance(xobjects, dict):
        raise Unsupported("resources")
    decoders: dict[bytes, Any] = {}
    decode: Any = None
    operands: list = []  # tokens since the last operator; arrays as lists of them
    arrays: list[list] = []
    for raw in _TOKEN_RE.findall(data):
        c = raw[0]
        if c in _OPERAND_START or (c in _STRING_START and len(raw) > 1) or raw in (b"<<", b">>"):
            (arrays[-1] if arrays else operands).append(raw)
            continue
        if c == 0x5B:
            arrays.append([])
            continue
        if c == 0x5D:
            if not arrays:
                raise Unsupported("unbalanced array")
            done = arrays.pop()
            (arrays[-1] if arrays else operands).append(done)
            continue
        if c == 0x25:  # comment
            continue
        if c in _NOT_OPERATOR:
            raise Unsupported(f"unexpected {raw[:10]!r}")
        # an operator
        if arrays:
            raise Unsupported("operator in an array")
        if raw == b"Tf":
            name = operands[-2] if len(operands) >= 2 else b""
            if name[:1] != b"/":
                raise Unsupported("Tf")
            if name not in decoders:
                key = _unescape_name(name[1:])
                if key not in fonts:
                    raise Unsupported("unknown font")
                decoders[name] = _decoder(f, fonts[key])
            decode = decoders[name]
        elif raw in (b"Tj", b"'", b'"'):
            last = operands[-1] if operands else b""
            if not isinstance(last, bytes) or last[:1] not in (b"(", b"<") or decode is None:
                raise Unsupported("show")
            if raw != b"Tj":
                out.append(" ")
            out.append(decode(_string(last)))
        elif raw == b"TJ":
            if not operands or not isinstance(operands[-1], list) or decode is None:
                raise Unsupported("show")
            for v in operands[-1]:
                if not isinstance(v, bytes):
                    raise Unsupported("nested array")
                if v[0] in (0x28, 0x3C):
                    out.append(decode(_string(v)))
                elif v[0] in _NUMBER_START and float(v) < -250:
                    out.append(" ")
        elif raw in (b"Td", b"TD", b"Tm", b"T*", b"BT", b"ET"):
            out.append(" ")
        elif raw == b"Do":
            name = operands[-1] if operands else b""
            if not isinstance(name, bytes) or name[:1] != b"/":
                raise Unsupported("Do")
            xo = f.get(xobjects.get(_unescape_name(name[1:])))
            if not isinstance(xo, tuple) or xo[0].get("Subtype") != "Image":
                raise Unsupported("form XObject")
        elif raw in (b"BI", b"ID", b"EI", b"R"):
            raise Unsupported("inline image")
        operands.clear()
    if arrays:
        raise Unsupported("unbalanced array")
    out.append(" ")


def simple_text(data: bytes, max_pages: int, pages: int) -> str | None:
    """The text of the first ``max_pages`` pages, or ``None`` when the file is not of the
    plain kind this module reads. ``pages`` is the page count PDFium found: ours must agree."""
    try:
        f = _File(data)
        found = _pages(f, max_pages)
        if len(found) != min(pages, max_pages):
            return None
        out: list[str] = []
        for page, res in found:
            _page_text(f, page, res, out)
        return "".join(out)
    except (Unsupported, ValueError, TypeError, KeyError, IndexError, RecursionError, zlib.error):
        return None


__all__ = ["simple_text"]
