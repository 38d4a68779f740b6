"""The booking pages over ASGI: staff book on behalf of a patient from the agenda and change the
opening rules; a proxy books and cancels for the person they help; a patient joins a waiting list."""

from __future__ import annotations

import re
from datetime import timedelta

import httpx

from parcours.security import totp as totp_codes
from parcours.services.booking import model
from tests.accounts_helpers import PASSWORD, create_resource, new_account, random_ip, totp_now
from tests.booking_helpers import define, free_slots, monday_after, new_practice
from tests.conftest import BASE, uniq

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def web(app) -> httpx.AsyncClient:  # type: ignore[no-untyped-def]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(random_ip(), 40000)), base_url=BASE)


async def csrf(c: httpx.AsyncClient, page: str) -> str:
    m = CSRF_RE.search((await c.get(page)).text)
    assert m
    return m.group(1)


async def sign_in(c: httpx.AsyncClient, email: str, secret: str | None = None, platform=None) -> None:  # type: ignore[no-untyped-def]
    r = await c.post("/signin", data={"email": email, "password": PASSWORD, "csrf_token": await csrf(c, "/signin")})
    assert r.status_code == 303, r.text
    if secret:
        r = await c.post("/signin/totp", data={"code": totp_now(secret, platform.clock.now()),
                                               "csrf_token": await csrf(c, "/signin/totp")})
        assert r.status_code == 303, r.text


async def test_staff_book_on_behalf_and_change_the_openings(app, client, platform) -> None:
    pr = await new_practice(client)
    now = monday_after(platform.clock.now())
    sid, _ = await define(platform, pr["role"], ["mon-fri 14:00-16:00 consultation 30"], now=now)
    slot = (await free_slots(client, sid))[0]
    family = "Vasseur" + uniq("")[-4:]
    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": family, "given": ["Rose"]}],
                                         "birthDate": "1950-04-02"})
    secret = totp_codes.new_secret()
    staff = await new_account(platform, "staff", f"PractitionerRole/{pr['role']}", totp_secret=secret, display_name="Accueil")
    day = model.slot_start(slot).astimezone(model.PARIS).date().isoformat()
    async with web(app) as c:
        await sign_in(c, staff.email, secret, platform)
        agenda = await c.get(f"/workspace/agenda?date={day}")
        assert agenda.status_code == 200 and f'/booking/slots/{slot["id"]}' in agenda.text
        page = await c.get(f"/booking/slots/{slot['id']}", params={"who": family})
        assert page.status_code == 200 and f'value="Patient/{pid}"' in page.text
        r = await c.post(f"/booking/slots/{slot['id']}/book", data={"patient": f"Patient/{pid}",
                                                                   "csrf_token": await csrf(c, f"/booking/slots/{slot['id']}")})
        assert r.status_code == 303 and "done=booked" in r.headers["location"] and f"date={day}" in r.headers["location"]
        agenda = await c.get(r.headers["location"])
        assert family in agenda.text and "Le rendez-vous" not in agenda.text
        # New openings: the booked slot stays, the others follow the rules.
        r = await c.post(f"/workspace/agenda/{pr['role']}/rules", data={
            "rules": "mon-fri 08:00-09:00 consultation 20\ntue 17:00-18:00 teleconsultation 15 video",
            "leaves": f"{(now + timedelta(days=7)).date().isoformat()} {(now + timedelta(days=9)).date().isoformat()} Congés",
            "cancel_hours": "48", "notice_minutes": "30", "horizon_days": "21",
            "csrf_token": await csrf(c, "/workspace/agenda")})
        assert r.status_code == 303 and "done=rules_saved" in r.headers["location"], r.text
        agenda = await c.get(r.headers["location"])
        assert "mon,tue,wed,thu,fri 08:00-09:00 consultation 20" in agenda.text
    appt = (await client.get("/fhir/Appointment", params={"slot": f"Slot/{slot['id']}"})).json()["entry"][0]["resource"]
    assert appt["status"] == "booked"
    assert appt["extension"][0]["valueReference"]["reference"] == f"PractitionerRole/{pr['role']}"  # who booked
    sched = model.read_availability((await client.get(f"/fhir/Schedule/{sid}")).json())
    assert sched.policy == model.Policy(48, 21, 30) and [lv.reason for lv in sched.leaves] == ["Congés"]
    assert (await client.get(f"/fhir/Slot/{slot['id']}")).json()["status"] == "busy"


async def test_a_proxy_books_and_cancels_and_a_patient_joins_a_waiting_list(app, client, platform) -> None:
    pr = await new_practice(client)
    now = monday_after(platform.clock.now())
    sid, _ = await define(platform, pr["role"], ["mon-fri 10:00-11:00 consultation 30"], now=now)
    slot = (await free_slots(client, sid))[1]
    helped = await create_resource(client, {"resourceType": "Patient", "name": [{"family": "Fabre", "given": ["Odette"]}]})
    rp = await create_resource(client, {"resourceType": "RelatedPerson", "active": True, "patient": {"reference": f"Patient/{helped}"},
                                        "name": [{"family": "Fabre", "given": ["Luc"]}]})
    proxy = await new_account(platform, "proxy", f"RelatedPerson/{rp}")
    async with web(app) as c:
        await sign_in(c, proxy.email)
        page = await c.get(f"/booking/slots/{slot['id']}")
        assert "Pour Odette Fabre." in page.text
        r = await c.post(f"/booking/slots/{slot['id']}/book", data={"patient": f"Patient/{helped}",
                                                                   "csrf_token": await csrf(c, f"/booking/slots/{slot['id']}")})
        assert r.headers["location"] == "/portal/appointments?done=booked"
        mine = await c.get("/portal/appointments?done=booked")
        assert "Votre rendez-vous est réservé" in mine.text and "Durand" in mine.text
        appt_id = re.search(r'/booking/appointments/([^/]+)/cancel', mine.text).group(1)  # type: ignore[union-attr]
        r = await c.post(f"/booking/appointments/{appt_id}/cancel", data={"csrf_token": await csrf(c, "/portal/appointments")})
        assert r.headers["location"] == "/portal/appointments?done=cancelled"
    assert (await client.get(f"/fhir/Slot/{slot['id']}")).json()["status"] == "free"

    pid = await create_resource(client, {"resourceType": "Patient", "name": [{"family": "Noël", "given": ["Paul"]}]})
    patient = await new_account(platform, "patient", f"Patient/{pid}")
    async with web(app) as c:
        await sign_in(c, patient.email)
        profile = await c.get(f"/booking/practitioners/{pr['role']}")
        assert profile.status_code == 200 and "Je souhaite être reçu avant le" in profile.text
        before = (now + timedelta(days=10)).date().isoformat()
        r = await c.post(f"/booking/practitioners/{pr['role']}/waitlist",
                         data={"before": before, "csrf_token": await csrf(c, f"/booking/practitioners/{pr['role']}")})
        assert r.headers["location"] == "/portal/appointments?done=waitlisted"
        mine = await c.get(r.headers["location"])
        assert "En attente d'un créneau".replace("'", "&#39;") in mine.text and "Durand" in mine.text
        # The search page may load the map's tiles from the tile server, and nothing else may.
        search = await c.get("/booking/search", params={"place": "80021", "radius": "1"})
        assert "img-src 'self' data: https://tile.openstreetmap.org;" in search.headers["content-security-policy"]
        assert "tile.openstreetmap.org" not in mine.headers["content-security-policy"]
        # The calendar link.
        r = await c.post("/booking/feed", data={"csrf_token": await csrf(c, "/portal/appointments")})
        feed = httpx.URL(r.headers["location"]).params["feed"]
        assert feed.startswith(f"{BASE}/booking/feed/") and feed.endswith(".ics")
        assert (await c.get(feed.removeprefix(BASE))).status_code == 200
