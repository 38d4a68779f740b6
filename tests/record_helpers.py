"""Shared helpers of the shared-record tests: people with a care relationship, files
(PDF, PNG, hostile ones) made in the test, and a fake ClamAV daemon on a unix socket."""

from __future__ import annotations

import asyncio
import io
import struct
from dataclasses import dataclass
from pathlib import Path

import httpx

from parcours.fhir import fr_core
from parcours.security import tokens
from parcours.services.platform import Platform
from tests.accounts_helpers import create_resource
from tests.conftest import FIXTURES, uniq

RECORD = FIXTURES / "record"
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def bearer(platform: Platform, kind: str, fhir_user: str | None) -> dict[str, str]:
    scopes = ["openid", "fhirUser", "patient/*.*" if kind in ("patient", "proxy") else "user/*.*"]
    return {"Authorization": "Bearer " + tokens.issue(platform.token_key, subject=uniq(kind), kind=kind, scopes=scopes,
                                                      fhir_user=fhir_user)}


def new_ins() -> str:
    return "2" + "".join(ch for ch in uniq("") + uniq("") if ch.isdigit()).ljust(14, "7")[:14]


@dataclass
class People:
    patient_id: str
    ins: str
    family: str
    patient: dict[str, str]  # bearer headers
    doctor_id: str
    doctor: dict[str, str]
    outsider: dict[str, str]  # a professional with no care relationship
    org_id: str


async def people(client: httpx.AsyncClient, platform: Platform, *, birth: str = "1979-03-28", gender: str = "female",
                 family: str | None = None, given: str = "Dominique") -> People:
    family = family or ("Record" + uniq("")[1:8].upper())
    ins = new_ins()
    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": family, "given": [given]}],
                                         "birthDate": birth, "gender": gender,
                                         "identifier": [{"system": fr_core.INS_NIR_SYSTEM, "value": ins}],
                                         "telecom": [{"system": "email", "value": f"{uniq('p')}@example.org"}]})
    org = await create_resource(client, {"resourceType": "Organization", "name": "Maison de santé du Parc"})
    doctor = await create_resource(client, {"resourceType": "Practitioner", "name": [{"family": "Médecin", "given": ["Marc"]}],
                                            "identifier": [{"system": fr_core.RPPS_SYSTEM, "value": "8" + uniq("1")}]})
    outsider = await create_resource(client, {"resourceType": "Practitioner", "name": [{"family": "Ailleurs", "given": ["Ana"]}]})
    await create_resource(client, {"resourceType": "CareTeam", "status": "active", "subject": {"reference": f"Patient/{pid}"},
                                   "participant": [{"member": {"reference": f"Practitioner/{doctor}"}}]})
    return People(pid, ins, family, bearer(platform, "patient", f"Patient/{pid}"), doctor,
                  bearer(platform, "practitioner", f"Practitioner/{doctor}"),
                  bearer(platform, "practitioner", f"Practitioner/{outsider}"), org)


def make_pdf(*lines: str, pages: int = 1) -> bytes:
    from reportlab.lib.pagesizes import A4
    from reportlab.pdfgen import canvas

    buf = io.BytesIO()
    c = canvas.Canvas(buf, pagesize=A4, invariant=True)
    for p in range(pages):
        y = 800
        for line in lines:
            c.drawString(72, y, line)
            y -= 16
        c.showPage()
    c.save()
    return buf.getvalue()


def make_png(width: int = 32, height: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def png_bomb() -> bytes:
    """A valid PNG header announcing 100 000 x 100 000 pixels (10 gigapixels) over a few bytes."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def fixture(name: str) -> bytes:
    return (RECORD / name).read_bytes()


class FakeClamd:
    """A unix-socket server speaking clamd's INSTREAM: 'FOUND' when the stream holds EICAR."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.scanned = 0

    async def __aenter__(self) -> "FakeClamd":
        self.server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        command = await reader.readuntil(b"\0")
        assert command == b"zINSTREAM\0", command
        data = bytearray()
        while True:
            size = struct.unpack(">I", await reader.readexactly(4))[0]
            if size == 0:
                break
            data += await reader.readexactly(size)
        self.scanned += 1
        reply = b"stream: Eicar-Test-Signature FOUND\0" if EICAR in data else b"stream: OK\0"
        writer.write(reply)
        await writer.drain()
        writer.close()
