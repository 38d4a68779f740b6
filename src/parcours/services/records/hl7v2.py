"""HL7 v2 messages: a small, strict parser, the ORU^R01 content model, and acknowledgements.

A parser of our own rather than the ``hl7`` package: its containers nest to a depth that
depends on the content (a component with one subcomponent is not the same shape as one
with two), which makes field access fragile; the grammar needed here is small. This one
reads the separators from MSH-1/MSH-2, accepts ``\\r``, ``\\n`` or ``\\r\\n`` between
segments (the CI-SIS samples use ``\\n``), unescapes ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ \\Xhh\\``,
and keeps fields raw until asked: ``field(seg, 3)`` then ``comps`` / ``subs`` / ``reps``.

:func:`read_oru` turns an ORU^R01 into plain data (patient identity, orders, results,
embedded documents, CI-SIS DMP/MSSanté metadata rows); :func:`ack` builds the MSA answer
(AA accepted, AE application error, AR rejected).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime

from parcours.services.records.cda import parse_time

INS_OIDS = {"1.2.250.1.213.1.4.8": "INS-NIR", "1.2.250.1.213.1.4.9": "INS-NIA"}
TEST_INS_OIDS = {"1.2.250.1.213.1.4.10": "INS-NIR-TEST", "1.2.250.1.213.1.4.11": "INS-NIA-TEST"}


class HL7Error(ValueError):
    """The message cannot be read at all (ACK AR)."""


class Unsupported(ValueError):
    """The message is readable but not something this receiver handles (ACK AR with the reason)."""


@dataclass
class Message:
    segments: list[list[str]]
    field_sep: str = "|"
    comp_sep: str = "^"
    rep_sep: str = "~"
    esc: str = "\\"
    sub_sep: str = "&"

    def all(self, name: str) -> list[list[str]]:
        return [s for s in self.segments if s and s[0] == name]

    def first(self, name: str) -> list[str] | None:
        found = self.all(name)
        return found[0] if found else None

    def unescape(self, value: str) -> str:
        if self.esc not in value:
            return value
        out, i = [], 0
        table = {"F": self.field_sep, "S": self.comp_sep, "T": self.sub_sep, "R": self.rep_sep, "E": self.esc}
        while i < len(value):
            c = value[i]
            if c == self.esc:
                j = value.find(self.esc, i + 1)
                if j < 0:
                    out.append(value[i:])
                    break
                code = value[i + 1:j]
                if code in table:
                    out.append(table[code])
                elif code.startswith("X"):
                    try:
                        out.append(bytes.fromhex(code[1:]).decode("utf-8", "replace"))
                    except ValueError:
                        pass
                elif code in (".br", "H", "N"):
                    out.append("\n" if code == ".br" else "")
                i = j + 1
            else:
                out.append(c)
                i += 1
        return "".join(out)

    def reps(self, raw: str) -> list[str]:
        return raw.split(self.rep_sep) if raw else []

    def comps(self, raw: str) -> list[str]:
        return raw.split(self.comp_sep)

    def subs(self, raw: str) -> list[str]:
        return raw.split(self.sub_sep)

    def comp(self, raw: str, i: int) -> str:
        """Component ``i`` (1-based) of a field, unescaped."""
        parts = self.comps(raw)
        return self.unescape(parts[i - 1]) if len(parts) >= i else ""


def field(seg: list[str] | None, i: int) -> str:
    """Field ``i`` (HL7 numbering: MSH-3 is ``field(msh, 3)``)."""
    if seg is None:
        return ""
    return seg[i] if 0 < i < len(seg) else ""


def parse(data: bytes | str) -> Message:
    if isinstance(data, bytes):
        if data.startswith(b"\xef\xbb\xbf"):
            data = data[3:]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = data.decode("latin-1")  # 8859/1, the other charset French senders use
    else:
        text = data.lstrip("\ufeff")
    text = text.strip("\x0b\x1c\r\n ")
    if not text.startswith("MSH") or len(text) < 8:
        raise HL7Error("The message does not start with an MSH segment")
    fs = text[3]
    enc = text[4:text.index(fs, 4)] if fs in text[4:] else ""
    if len(enc) < 4:
        raise HL7Error("MSH-2 (encoding characters) is incomplete")
    msg = Message([], fs, enc[0], enc[1], enc[2], enc[3])
    for line in re.split(r"\r\n|\r|\n", text):
        if not line.strip():
            continue
        if not re.match(r"^[A-Z][A-Z0-9]{2}$", line[:3]) or (len(line) > 3 and line[3] != fs):
            raise HL7Error(f"Not a segment: {line[:20]!r}")
        msg.segments.append(line.split(fs))
    msh = msg.segments[0]
    msh.insert(1, fs)  # so that field(msh, 2) is MSH-2 and list positions match the numbering
    return msg


# -- ORU^R01 content -------------------------------------------------------------------------------------

@dataclass
class Identifier:
    value: str
    authority: str  # assigning authority's name
    oid: str  # its universal id (ISO OID)
    type_code: str  # CX-5: INS, PI, NH...


@dataclass
class PatientIdentity:
    identifiers: list[Identifier]
    family: str
    given: str
    birth_date: str | None  # YYYY-MM-DD
    sex: str | None  # FHIR gender

    def ins(self, *, accept_test: bool) -> Identifier | None:
        oids = dict(INS_OIDS, **(TEST_INS_OIDS if accept_test else {}))
        for ident in self.identifiers:
            if ident.oid in oids and ident.value:
                return ident
        return None

    def display(self) -> str:
        return " ".join(p for p in (self.family, self.given) if p)


@dataclass
class Result:
    set_id: str
    value_type: str
    code: str
    display: str
    system: str  # LN for LOINC
    value: str  # raw, unescaped
    numeric: float | None
    comparator: str | None
    units: str
    units_system: str
    reference_range: str
    flags: list[str]
    status: str  # OBX-11: F final, C corrected, P preliminary, D deleted, X cannot be obtained
    observed: str | None
    document: bytes | None = None  # ED: the decoded document
    document_type: str | None = None  # ED subtype: XML, PDF...


@dataclass
class Order:
    placer: str
    filler: str
    code: str
    display: str
    system: str
    observed: str | None
    reported: str | None
    status: str  # OBR-25
    order_control: str  # ORC-1
    results: list[Result] = dc_field(default_factory=list)
    metadata: dict[str, str] = dc_field(default_factory=dict)  # CI-SIS MetaDMPMSS rows: MASQUE_PS=N...


@dataclass
class LabMessage:
    control_id: str
    sending_app: str
    sending_facility: str
    receiving_app: str
    receiving_facility: str
    message_type: str
    version: str
    sent_at: str | None
    patient: PatientIdentity
    orders: list[Order]

    def summary(self) -> str:
        results = sum(1 for o in self.orders for r in o.results if r.value_type != "ED" and r.system != "MetaDMPMSS")
        docs = sum(1 for o in self.orders for r in o.results if r.document)
        return f"{len(self.orders)} order(s), {results} result(s), {docs} document(s)"


GENDERS = {"F": "female", "M": "male", "O": "other", "U": "unknown", "A": "other", "N": "unknown"}
META_RE = re.compile(r"^[A-Z][A-Z0-9_]+$")  # CI-SIS routing rows: DESTDMP, MASQUE_PS... (LOINC codes are digits)
NUM_RE = re.compile(r"^\s*([<>]=?)?\s*([-+]?\d+(?:[.,]\d+)?)\s*$")


def _date(value: str) -> str | None:
    t = parse_time(value)
    return t[:10] if t and len(t) >= 10 else t


def read_oru(msg: Message) -> LabMessage:
    msh = msg.segments[0]
    mtype = field(msh, 9)
    parts = msg.comps(mtype)
    if parts[0] != "ORU" or (len(parts) > 1 and parts[1] not in ("R01", "")):
        raise Unsupported(f"Only ORU^R01 lab results are received here, not {mtype}")
    pid = msg.first("PID")
    if pid is None:
        raise Unsupported("The message has no PID segment: whose results are they?")
    idents = []
    for rep in msg.reps(field(pid, 3)):
        c = msg.comps(rep)
        auth = msg.subs(c[3]) if len(c) > 3 else [""]
        idents.append(Identifier(msg.unescape(c[0]), msg.unescape(auth[0]), auth[1] if len(auth) > 1 else "",
                                 c[4] if len(c) > 4 else ""))
    name = msg.reps(field(pid, 5))
    first_name = msg.comps(name[0]) if name else [""]
    patient = PatientIdentity(idents, msg.unescape(first_name[0]), msg.unescape(first_name[1]) if len(first_name) > 1 else "",
                              _date(field(pid, 7)), GENDERS.get(field(pid, 8)))
    orders: list[Order] = []
    current: Order | None = None
    control = ""
    for seg in msg.segments[1:]:
        kind = seg[0]
        if kind == "ORC":
            control = field(seg, 1)
        elif kind == "OBR":
            current = Order(placer=msg.comp(field(seg, 2), 1), filler=msg.comp(field(seg, 3), 1), code=msg.comp(field(seg, 4), 1),
                            display=msg.comp(field(seg, 4), 2), system=msg.comp(field(seg, 4), 3), observed=parse_time(field(seg, 7)),
                            reported=parse_time(field(seg, 22)), status=field(seg, 25) or "F", order_control=control)
            orders.append(current)
        elif kind == "OBX":
            if current is None:
                raise Unsupported("An OBX comes before any OBR")
            r = _result(msg, seg)
            if r.system == "MetaDMPMSS" or (not r.system and r.value_type in ("CE", "CWE", "ED") and META_RE.match(r.code)):
                current.metadata[r.code] = msg.comp(field(seg, 5), 1)
                continue
            current.results.append(r)
    if not orders:
        raise Unsupported("The message has no OBR segment: no results to store")
    return LabMessage(
        control_id=field(msh, 10), sending_app=msg.comp(field(msh, 3), 1), sending_facility=msg.comp(field(msh, 4), 1),
        receiving_app=msg.comp(field(msh, 5), 1), receiving_facility=msg.comp(field(msh, 6), 1), message_type=mtype,
        version=msg.comp(field(msh, 12), 1), sent_at=parse_time(field(msh, 7)), patient=patient, orders=orders)


def _result(msg: Message, seg: list[str]) -> Result:
    vtype = field(seg, 2)
    raw = field(seg, 5)
    units = field(seg, 6)
    r = Result(set_id=field(seg, 1), value_type=vtype, code=msg.comp(field(seg, 3), 1), display=msg.comp(field(seg, 3), 2),
               system=msg.comp(field(seg, 3), 3), value=msg.unescape(raw), numeric=None, comparator=None,
               units=msg.comp(units, 1), units_system=msg.comp(units, 3), reference_range=msg.unescape(field(seg, 7)),
               flags=[f for f in msg.reps(field(seg, 8)) if f], status=field(seg, 11) or "F",
               observed=parse_time(field(seg, 14)))
    if vtype in ("NM", "SN"):
        text = raw
        if vtype == "SN":
            c = msg.comps(raw)
            text = (c[0] if c[0] in ("<", ">", "<=", ">=") else "") + (c[1] if len(c) > 1 else "")
        m = NUM_RE.match(text.replace(msg.comp_sep, ""))
        if m:
            r.comparator = m.group(1)
            r.numeric = float(m.group(2).replace(",", "."))
    elif vtype == "ED":
        c = msg.comps(raw)
        # ED: source ^ type ^ subtype ^ encoding ^ data
        if len(c) >= 5 and c[3].lower() == "base64":
            try:
                r.document = base64.b64decode(c[4] + "=" * (-len(c[4]) % 4), validate=False)
            except (binascii.Error, ValueError):
                r.document = None
            r.document_type = c[2].upper() or None
    elif vtype in ("CE", "CWE", "CNE"):
        r.value = msg.comp(raw, 2) or msg.comp(raw, 1)
    return r


def escape(text: str, msg: Message | None = None) -> str:
    fs, cs, rs, esc, ss = (msg.field_sep, msg.comp_sep, msg.rep_sep, msg.esc, msg.sub_sep) if msg else ("|", "^", "~", "\\", "&")
    out = text.replace(esc, f"{esc}E{esc}")
    for ch, code in ((fs, "F"), (cs, "S"), (ss, "T"), (rs, "R")):
        out = out.replace(ch, f"{esc}{code}{esc}")
    return out


# -- acknowledgements -------------------------------------------------------------------------------------

def ack(msg: Message | None, code: str, text: str = "", *, now: datetime, control_id: str) -> str:
    """An ACK for ``msg`` (or for an unreadable message): MSA-1 ``AA``, ``AE`` or ``AR``."""
    fs, cs = (msg.field_sep, msg.comp_sep) if msg else ("|", "^")
    enc = f"{msg.comp_sep}{msg.rep_sep}{msg.esc}{msg.sub_sep}" if msg else "^~\\&"
    msh = msg.segments[0] if msg else None
    trigger = msg.comps(field(msh, 9))[1] if msg and len(msg.comps(field(msh, 9))) > 1 else ""
    safe = escape(re.sub(r"[\r\n]+", " ", text)[:200], msg)
    segs = [
        fs.join(["MSH", enc, field(msh, 5) or "PARCOURS", field(msh, 6) or "PARCOURS", field(msh, 3), field(msh, 4),
                 now.strftime("%Y%m%d%H%M%S"), "", f"ACK{cs}{trigger}{cs}ACK" if trigger else "ACK", control_id,
                 field(msh, 11) or "P", field(msh, 12) or "2.5"]),
        fs.join(["MSA", code, field(msh, 10), safe]),
    ]
    if code != "AA":
        segs.append(fs.join(["ERR", "", "", "", "E" if code == "AE" else "F", "", "", "", safe]))
    return "\r".join(segs) + "\r"


__all__ = ["HL7Error", "LabMessage", "Message", "Order", "PatientIdentity", "Result", "Unsupported", "ack", "field", "parse",
           "read_oru"]
