"""``Patient/$everything`` narrowed in SQL, for views that show part of a record (the timeline).

:func:`everything_rows` takes the same door as :meth:`Repository.everything`: the policy
allows ``everything`` on the Patient, the Patient is read through the Repository (its own
decision and audit entry), every type is asked of the role matrix and narrowed by
``Repository.scope_where``, and the request leaves one ``everything`` audit entry (the
statement is sent in one pipeline with the Patient's read, and its rows are used only once
that read is allowed). What
changes is the statement: one ``UNION ALL`` over the types, returning only the id and the
JSON text, and two optional narrowings a view may ask for:

* ``window``: only resources with a date that starts in ``[lo, hi)``. The caller names, per
  type, the date search parameters that index every date it reads (``DateFilter.codes``: the
  start of the value's range, ``lo`` of its ``"<Type>_idx"`` rows, is tested; for a Period,
  its start), and the JSON keys of dates no parameter indexes (``DateFilter.keys``: rows
  whose text names one are kept). The result is a superset: the caller makes the exact test
  on the rows it gets, and widens the window by the zone offsets it needs. Without a window,
  at most ``limit`` resources per type, the oldest first, as ``$everything``.
* ``listed``: leave out resources that a resource of another type, visible to the caller in
  the same record, lists under a reference parameter (observations shown through their report).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Text, and_, any_, exists, func, literal, or_, select, union_all
from sqlalchemy.dialects.postgresql import ARRAY, array

from parcours.core.errors import InvalidSearch
from parcours.fhir.indexing import SEP
from parcours.security.policy import decide
from parcours.store.repository import Repository, _issue
from parcours.store.schema import tables
from parcours.store.sql import compile_stmt


@dataclass(frozen=True)
class DateFilter:
    """Where the dates a view reads are indexed: ``codes`` are date search parameters of the
    type; ``keys`` are JSON keys of dates that no parameter indexes."""

    codes: tuple[str, ...]
    keys: tuple[str, ...] = ()


async def everything_rows(repo: Repository, patient_id: str, types: list[str], *,
                          window: tuple[datetime, datetime] | None = None, dates: dict[str, DateFilter] | None = None,
                          listed: dict[str, tuple[str, str]] | None = None,
                          limit: int = 10_000) -> list[tuple[str, str, str]]:
    """(type, id, JSON text) of the current resources of ``types`` in the patient's compartment
    that the caller may see. ``dates`` must name every type when ``window`` is given.
    ``listed`` maps a type to (listing type, reference parameter)."""
    repo.authorize("everything", "Patient")
    for t in types:
        if not repo.registry.is_type(t):
            raise InvalidSearch(f"Unknown resource type in _type: {t!r}", [_issue("not-supported", f"Unknown resource type {t!r}", "_type")])
    key = f"Patient/{patient_id}"
    in_record = literal([key], ARRAY(Text))
    wanted = set(types)
    branches = []
    for rtype in repo.registry.patient_compartment:
        if rtype not in wanted or rtype == "Patient" or not decide(repo.caller, "everything", rtype).allowed:
            continue
        t = tables(rtype)
        m = t.main
        conds = [m.c.compartments.contains(in_record), m.c.deleted.is_(False), await repo.scope_where(rtype)]
        if window is not None:
            f = (dates or {})[rtype]
            i = t.idx
            dated = exists().where(i.c.resource_id == m.c.id, i.c.code == any_(literal(list(f.codes), ARRAY(Text))),
                                   i.c.lo >= window[0], i.c.lo < window[1])
            conds.append(or_(dated, *(func.strpos(m.c.content, f'"{k}"') > 0 for k in f.keys)))
        lister = (listed or {}).get(rtype)
        if lister and lister[0] in wanted and decide(repo.caller, "everything", lister[0]).allowed:
            lt = tables(lister[0]).main
            ref = func.concat(f"{lister[1]}{SEP}{rtype}/", m.c.id)
            conds.append(~exists().where(lt.c.compartments.contains(in_record), lt.c.deleted.is_(False),
                                         await repo.scope_where(lister[0]), lt.c.refs.contains(array([ref], type_=Text))))
        branch = select(literal(rtype, Text).label("rtype"), m.c.id, m.c.content).where(and_(*conds))
        branches.append(branch if window is not None else branch.order_by(m.c.last_updated).limit(limit))
    # The statement (narrowed for the caller: it returns nothing they may not see) goes to the
    # server with the Patient's read, whose decision comes first: refused, its rows are dropped.
    rows: list[tuple[str, str, str]] = []
    async with repo.conn.pipeline():
        cur = None
        if branches:
            stmt = union_all(*(b.subquery().select() for b in branches)) if len(branches) > 1 else branches[0]
            sql, params = compile_stmt(stmt)
            cur = await repo.conn.execute(sql, params)
        await repo.read("Patient", patient_id)
        if cur is not None:
            rows = [(r[0], r[1], r[2]) for r in await cur.fetchall()]
        repo.attempt = ("everything", "Patient", patient_id)
        await repo._audit("everything", "Patient", patient_id, patients=[key])  # noqa: SLF001 - the Repository's own audit entry
    return rows


__all__ = ["DateFilter", "everything_rows"]
