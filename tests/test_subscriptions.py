"""FHIR R4 Subscriptions through the API: rest-hook and websocket channels.

Real PostgreSQL and real HTTP: a rest-hook receiver runs in a thread of the test;
websockets go to the ``live_server``. Each wait is for a condition, bounded by a
timeout; "nothing was sent" is asserted once the matcher has passed the writes
and the delivery queue of the subscription is empty.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from parcours.events.log import LogPosition
from parcours.events.runtime import Events
from parcours.security import tokens
from parcours.security.caller import SYSTEM
from parcours.services.platform import TOKEN_KEY, Platform
from parcours.store import secrets
from tests.conftest import uniq

TIMEOUT = 20.0
LOINC = "http://loinc.org"


# -- a rest-hook receiver ---------------------------------------------------------------------
@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def resource(self) -> dict:
        return orjson.loads(self.body)


class Receiver:
    """An HTTP endpoint that records every request and answers 200, or 500 as told."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.cond = threading.Condition()
        self.failures: dict[str, int] = {}  # path prefix -> 500 answers still to give (-1: always)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status = receiver._status(self.path)
                with receiver.cond:
                    receiver.requests.append(Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    receiver.cond.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = _handle

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _status(self, path: str) -> int:
        with self.cond:
            for prefix, left in self.failures.items():
                if path.startswith(prefix) and left != 0:
                    self.failures[prefix] = left - 1 if left > 0 else -1
                    return 500
        return 200

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def under(self, prefix: str) -> list[Received]:
        with self.cond:
            return [r for r in self.requests if r.path.startswith(prefix)]

    async def wait(self, prefix: str, done: Callable[[list[Received]], bool], timeout: float = TIMEOUT) -> list[Received]:
        def check() -> bool:
            with self.cond:
                return self.cond.wait_for(lambda: done([r for r in self.requests if r.path.startswith(prefix)]), timeout)

        assert await asyncio.to_thread(check), f"the receiver did not get what was expected under {prefix}: {self.under(prefix)}"
        return self.under(prefix)


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    r = Receiver()
    r.thread.start()
    yield r  # type: ignore[misc]
    r.server.shutdown()


@pytest_asyncio.fixture(scope="module")
async def events(platform: Platform) -> AsyncIterator[Events]:
    """The event machinery of the test process (the live server, when it runs, has its own)."""
    e = await Events.start(platform)
    yield e
    await e.close()


# -- helpers --------------------------------------------------------------------------------
async def create(client: httpx.AsyncClient, resource: dict) -> dict:
    r = await client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    return r.json()


async def update(client: httpx.AsyncClient, resource: dict) -> dict:
    r = await client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
    assert r.status_code == 200, r.text
    return r.json()


def observation(code: str, patient_id: str, value: float = 1.0) -> dict:
    return {"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code}]},
            "subject": {"reference": f"Patient/{patient_id}"}, "valueQuantity": {"value": value, "unit": "mmol/L"}}


def subscription(criteria: str, channel: dict) -> dict:
    return {"resourceType": "Subscription", "status": "requested", "reason": "test", "criteria": criteria, "channel": channel}


async def wait_status(client: httpx.AsyncClient, sid: str, status: str, timeout: float = TIMEOUT) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            r = await client.get(f"/fhir/Subscription/{sid}")
            assert r.status_code == 200, r.text
            if r.json()["status"] == status:
                return r.json()
            await asyncio.sleep(0.05)


async def subscribe(client: httpx.AsyncClient, criteria: str, channel: dict) -> str:
    sid = (await create(client, subscription(criteria, channel)))["id"]
    body = await wait_status(client, sid, "active")
    assert "error" not in body
    return sid


async def settled(platform: Platform, *sids: str, timeout: float = TIMEOUT) -> None:
    """Wait until the matcher has passed every change committed so far and nothing is
    waiting to be sent to these subscriptions: from then on, what was not received
    will not be."""
    async with platform.pool.connection() as conn:
        target = (await (await conn.execute("SELECT coalesce(max(seq), 0) FROM resource_log")).fetchone())[0]
    async with asyncio.timeout(timeout):
        while True:
            async with platform.pool.connection() as conn:
                head, gaps = (await (await conn.execute("SELECT head, gaps FROM event_cursor WHERE name = 'subscriptions'")).fetchone())
                waiting = (await (await conn.execute(
                    "SELECT count(*) FROM subscription_delivery WHERE subscription_id = ANY(%s)", (list(sids),))).fetchone())[0]
            if LogPosition.from_json(head, gaps).floor >= target and waiting == 0:
                return
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def patient_id(client: httpx.AsyncClient) -> str:
    return (await create(client, {"resourceType": "Patient", "identifier": [{"system": "urn:parcours:test", "value": uniq()}]}))["id"]


# -- rest-hook ------------------------------------------------------------------------------
async def test_rest_hook_sends_matching_changes_only(client, events, receiver, platform, patient_id) -> None:
    other_patient = (await create(client, {"resourceType": "Patient", "active": True}))["id"]
    code, prefix = uniq("code"), f"/hook/{uniq()}"
    sid = await subscribe(client, f"Observation?code={LOINC}|{code}&subject=Patient/{patient_id}", {
        "type": "rest-hook", "endpoint": receiver.url(prefix), "payload": "application/fhir+json",
        "header": ["Authorization: Bearer hook-secret", "X-Trace: parcours-test"]})

    await create(client, observation(uniq("other"), patient_id))  # other code
    await create(client, observation(code, other_patient))  # other patient
    o1 = await create(client, observation(code, patient_id))
    got = await receiver.wait(prefix, lambda rs: len(rs) >= 1)
    o1b = await update(client, {**o1, "valueQuantity": {"value": 2.0, "unit": "mmol/L"}})
    got = await receiver.wait(prefix, lambda rs: len(rs) >= 2)
    # An update that makes the resource stop matching sends nothing.
    await update(client, {**o1b, "code": {"coding": [{"system": LOINC, "code": uniq("gone")}]}})
    await settled(platform, sid)

    got = receiver.under(prefix)
    assert [(r.method, r.path, r.resource()["meta"]["versionId"]) for r in got] == [
        ("PUT", f"{prefix}/Observation/{o1['id']}", "1"), ("PUT", f"{prefix}/Observation/{o1['id']}", "2")]
    assert got[1].resource()["valueQuantity"]["value"] == 2.0
    for r in got:
        assert r.headers["authorization"] == "Bearer hook-secret"
        assert r.headers["x-trace"] == "parcours-test"
        assert r.headers["content-type"].startswith("application/fhir+json")


async def test_rest_hook_without_payload_posts_an_empty_notification(client, events, receiver, platform, patient_id) -> None:
    code, prefix = uniq("code"), f"/hook/{uniq()}"
    sid = await subscribe(client, f"Observation?code={code}", {"type": "rest-hook", "endpoint": receiver.url(prefix),
                                                              "header": ["X-Subscription: yes"]})
    await create(client, observation(code, patient_id))
    await receiver.wait(prefix, lambda rs: len(rs) >= 1)
    await settled(platform, sid)
    [r] = receiver.under(prefix)
    assert (r.method, r.path, r.body, r.headers["x-subscription"]) == ("POST", prefix, b"", "yes")


async def test_a_failed_notification_is_retried(client, events, receiver, platform, patient_id) -> None:
    code, prefix = uniq("code"), f"/hook/{uniq()}"
    receiver.failures[prefix] = 1  # the first answer is a 500
    sid = await subscribe(client, f"Observation?code={code}", {"type": "rest-hook", "endpoint": receiver.url(prefix)})
    await create(client, observation(code, patient_id))
    await receiver.wait(prefix, lambda rs: len(rs) >= 2)
    await settled(platform, sid)
    assert [r.method for r in receiver.under(prefix)] == ["POST", "POST"]
    assert (await wait_status(client, sid, "active")).get("error") is None


async def test_the_subscription_goes_to_error_after_the_last_attempt(client, events, receiver, platform, patient_id) -> None:
    code, prefix = uniq("code"), f"/hook/{uniq()}"
    receiver.failures[prefix] = -1  # always 500
    sid = await subscribe(client, f"Observation?code={code}", {"type": "rest-hook", "endpoint": receiver.url(prefix)})
    await create(client, observation(code, patient_id))
    body = await wait_status(client, sid, "error")
    attempts = platform.settings.subscription_max_attempts
    assert len(receiver.under(prefix)) == attempts
    assert f"failed {attempts} times" in body["error"] and "HTTP 500" in body["error"]
    # In error, it is no longer served.
    await create(client, observation(code, patient_id))
    await settled(platform, sid)
    assert len(receiver.under(prefix)) == attempts


@pytest.mark.parametrize(("criteria", "channel", "reason"), [
    ("Observation?no-such-parameter=1", {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x"}, "Unknown search parameter"),
    ("Nothing?code=1", {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x"}, "must start with a resource type"),
    ("Observation?_sort=date", {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x"}, "may only filter"),
    ("Observation?code=1", {"type": "email", "endpoint": "mailto:a@example.org"}, "not supported"),
    ("Observation?code=1", {"type": "rest-hook", "endpoint": "ftp://example.org/x"}, "http(s) endpoint"),
    ("Observation?code=1", {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/x", "payload": "application/fhir+xml"}, "not supported"),
])
async def test_a_subscription_that_cannot_be_served_goes_to_error(client, events, criteria, channel, reason) -> None:
    sid = (await create(client, subscription(criteria, channel)))["id"]
    body = await wait_status(client, sid, "error")
    assert reason in body["error"]


async def test_only_committed_changes_are_notified_in_any_commit_order(client, events, receiver, platform, patient_id) -> None:
    code, prefix = uniq("code"), f"/hook/{uniq()}"
    sid = await subscribe(client, f"Observation?code={code}", {"type": "rest-hook", "endpoint": receiver.url(prefix),
                                                              "payload": "application/fhir+json"})
    with pytest.raises(RuntimeError):
        async with platform.transaction(SYSTEM) as repo:
            await repo.create("Observation", observation(code, patient_id))
            raise RuntimeError("roll back")
    async with platform.pool.connection() as conn_a:
        async with conn_a.transaction():
            a = (await platform.repository(conn_a, SYSTEM).create("Observation", observation(code, patient_id))).stored
            b = await create(client, observation(code, patient_id))  # later seq, committed first
            await receiver.wait(prefix, lambda rs: any(r.path.endswith(b["id"]) for r in rs))
            assert not any(r.path.endswith(a.id) for r in receiver.under(prefix))
    await receiver.wait(prefix, lambda rs: any(r.path.endswith(a.id) for r in rs))
    await settled(platform, sid)
    assert sorted(r.path for r in receiver.under(prefix)) == sorted(f"{prefix}/Observation/{i}" for i in (a.id, b["id"]))


async def test_a_changed_subscription_is_matched_as_it_now_is(client, events, receiver, platform, patient_id) -> None:
    old, new, prefix = uniq("code"), uniq("code"), f"/hook/{uniq()}"
    channel = {"type": "rest-hook", "endpoint": receiver.url(prefix), "payload": "application/fhir+json"}
    sid = await subscribe(client, f"Observation?code={old}", channel)
    current = (await client.get(f"/fhir/Subscription/{sid}")).json()
    await update(client, {**current, "status": "requested", "criteria": f"Observation?code={new}"})
    await wait_status(client, sid, "active")
    await create(client, observation(old, patient_id))
    o = await create(client, observation(new, patient_id))
    await receiver.wait(prefix, lambda rs: len(rs) >= 1)
    # Turned off: nothing more.
    current = (await client.get(f"/fhir/Subscription/{sid}")).json()
    await update(client, {**current, "status": "off"})
    await create(client, observation(new, patient_id))
    await settled(platform, sid)
    assert [r.path for r in receiver.under(prefix)] == [f"{prefix}/Observation/{o['id']}"]


async def test_two_processes_send_each_notification_once(client, events, receiver, platform, patient_id) -> None:
    other = await Platform.start(platform.settings, run_migrations=False)
    other_events = await Events.start(other)
    try:
        code, prefix = uniq("code"), f"/hook/{uniq()}"
        sid = await subscribe(client, f"Observation?code={code}", {"type": "rest-hook", "endpoint": receiver.url(prefix),
                                                                  "payload": "application/fhir+json"})
        ids = [(await create(client, observation(code, patient_id)))["id"] for _ in range(5)]
        await receiver.wait(prefix, lambda rs: len(rs) >= 5)
        await settled(platform, sid)
        assert sorted(r.path for r in receiver.under(prefix)) == sorted(f"{prefix}/Observation/{i}" for i in ids)
    finally:
        await other_events.close()
        await other.close()


# -- websocket ------------------------------------------------------------------------------
def ws_url(live_server: str, token: str | None = None) -> str:
    url = live_server.replace("http://", "ws://") + "/fhir/$subscription-ws"
    return f"{url}?access_token={token}" if token else url


async def recv(ws: ClientConnection) -> str:
    return str(await asyncio.wait_for(ws.recv(), TIMEOUT))


@pytest_asyncio.fixture
async def live(live_server: str, live_token: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live_server, headers={"Authorization": f"Bearer {live_token}"}, timeout=TIMEOUT) as c:
        yield c


async def test_websocket_bind_and_ping(live, live_server, live_token) -> None:
    pid = (await create(live, {"resourceType": "Patient", "active": True}))["id"]
    code_a, code_b = uniq("code"), uniq("code")
    sub_a = await subscribe(live, f"Observation?code={LOINC}|{code_a}", {"type": "websocket"})
    sub_b = await subscribe(live, f"Observation?code={LOINC}|{code_b}", {"type": "websocket"})
    async with connect(ws_url(live_server, live_token)) as ws:
        await ws.send(f"bind {sub_a}")
        assert await recv(ws) == f"bound {sub_a}"
        await ws.send(f"bind {sub_b}")
        assert await recv(ws) == f"bound {sub_b}"
        await create(live, observation(code_b, pid))
        assert await recv(ws) == f"ping {sub_b}"
        await create(live, observation(uniq("other"), pid))  # matches neither: no ping before the next one
        await create(live, observation(code_a, pid))
        assert await recv(ws) == f"ping {sub_a}"
        await ws.send(f"unbind {sub_a}")
        assert await recv(ws) == f"unbound {sub_a}"
        await create(live, observation(code_a, pid))
        await create(live, observation(code_b, pid))
        assert await recv(ws) == f"ping {sub_b}"


async def test_websocket_refusals(live, live_server, live_token) -> None:
    hook = await subscribe(live, f"Observation?code={uniq()}", {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"})
    with pytest.raises(InvalidStatus) as e:
        async with connect(ws_url(live_server, "not-a-token")):
            pass
    assert e.value.response.status_code == 403
    async with connect(ws_url(live_server)) as ws:  # the token as the first message
        await ws.send(f"bearer {live_token}")
        await ws.send("bind no-such-subscription")
        assert (await recv(ws)).startswith("error no-such-subscription ")
        await ws.send(f"bind {hook}")
        assert "not websocket" in await recv(ws)


async def test_websocket_pings_only_what_the_caller_may_read(live, live_server, live_token, pg_uri) -> None:
    # This caller may read Subscriptions and Patients, not Observations.
    token = tokens.issue(secrets.get_or_create(pg_uri, TOKEN_KEY), subject="test-limited", kind="system",
                         scopes=["system/Subscription.read", "system/Patient.read"])
    pid = (await create(live, {"resourceType": "Patient", "active": True}))["id"]
    code, family = uniq("code"), uniq("family")
    on_obs = await subscribe(live, f"Observation?code={code}", {"type": "websocket"})
    on_patient = await subscribe(live, f"Patient?family={family}", {"type": "websocket"})
    async with connect(ws_url(live_server, token)) as limited, connect(ws_url(live_server, live_token)) as full:
        for ws, sid in ((limited, on_obs), (limited, on_patient), (full, on_obs)):
            await ws.send(f"bind {sid}")
            assert await recv(ws) == f"bound {sid}"
        await create(live, observation(code, pid))
        assert await recv(full) == f"ping {on_obs}"
        await create(live, {"resourceType": "Patient", "name": [{"family": family}]})
        # The Observation came first: had it been pinged, that ping would come first.
        assert await recv(limited) == f"ping {on_patient}"


async def test_websocket_closes_when_the_token_expires(live, live_server, pg_uri) -> None:
    key = secrets.get_or_create(pg_uri, TOKEN_KEY)
    expires = int(time.time()) + 2
    token = tokens.issue(key, subject="test-short", kind="system", scopes=["system/*.*"], now=expires - 3600, lifetime_s=3600)
    pid = (await create(live, {"resourceType": "Patient", "active": True}))["id"]
    code = uniq("code")
    sid = await subscribe(live, f"Observation?code={code}", {"type": "websocket"})
    async with connect(ws_url(live_server, token)) as ws:
        await ws.send(f"bind {sid}")
        assert await recv(ws) == f"bound {sid}"
        async with asyncio.timeout(TIMEOUT):  # until the token has expired
            while time.time() <= expires:
                await asyncio.sleep(0.05)
        await create(live, observation(code, pid))
        with pytest.raises(ConnectionClosed) as e:
            await recv(ws)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1008
