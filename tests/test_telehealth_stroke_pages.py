"""Tele-stroke pages without a browser: the roster form's checks, and the pages and socket refuse
anyone not signed in."""

from __future__ import annotations

from datetime import time

import pytest
import websockets

from parcours.services.telehealth import stroke
from parcours.web.stroke_pages import check_roster


def test_the_roster_form_keeps_what_was_typed_and_says_what_is_wrong() -> None:
    values, errors, shifts = check_roster({"specialty": "Neurologie", "site": "Location/chu",
                                           "day_0": "wed", "start_0": "20:00", "end_0": "08:00",
                                           "people_0": "Practitioner/a, Practitioner/b"})
    assert errors == [] and shifts == [stroke.Shift("wed", time(20), time(8), ("Practitioner/a", "Practitioner/b"))]
    values, errors, shifts = check_roster({"specialty": "", "site": "chu", "day_1": "mon", "start_1": "8h",
                                           "end_1": "20:00", "people_1": "Practitioner/a",
                                           "day_2": "tue", "start_2": "08:00", "end_2": "20:00", "people_2": "Dr A"})
    assert errors == ["stroke.error.specialty", "stroke.error.site", "stroke.error.times", "stroke.error.shift"]
    assert values["site"] == "chu" and values["rows"][1]["start"] == "8h" and values["rows"][2]["people"] == "Dr A"
    assert check_roster({"specialty": "N", "site": "Location/x"})[1] == ["stroke.error.no_shift"]


async def test_pages_and_socket_need_a_signed_in_session(anon, live_server: str) -> None:  # type: ignore[no-untyped-def]
    r = await anon.get("/workspace/stroke", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/signin")
    url = live_server.replace("http://", "ws://") + "/workspace/stroke/ws"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        async with websockets.connect(url, origin=live_server):  # no session cookie
            pass
    assert refused.value.response.status_code == 403
