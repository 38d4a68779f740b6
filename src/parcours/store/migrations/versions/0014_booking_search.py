"""Booking search: the free-slot index behind "next free slots" at national size.

Revision ID: 0014_booking_search
Revises: 0011_messaging_names
Create Date: 2026-11-25

``booking_free_slot`` holds one narrow row per *free* Slot (slot id, schedule id, start),
btree-indexed on ``(schedule_id, start)``, so that the next free slots of an agenda are one
index range scan (``ORDER BY start LIMIT n``) instead of a GIN lookup over all the slots of
the schedule followed by their ``start`` rows. It is maintained by a row trigger on the
``"Slot"`` table, in the transaction of every write (Repository writes, the booking rule,
COPY through the bulk path: row triggers fire for COPY too), so it can never disagree
with the stored Slots. Filled from the existing Slots here.

It also adds the spatial index of the directory search (``store.geo``): GiST over the
``cube`` of each Location position's unit vector (``"Location_idx"`` rows of code ``near``),
for nearest-first KNN scans bounded by the radius. ``cube`` is a contrib extension (trusted:
a database owner may create it) shipped with PostgreSQL 15 and with the embedded wheel.

Written out here rather than taken from ``parcours.store.booking`` so that this revision
keeps meaning the same thing when that module changes; ``tests/test_booking_search.py``
checks that both agree.
"""

import sqlalchemy as sa
from alembic import op

revision = "0014_booking_search"
down_revision = "0011_messaging_names"
branch_labels = None
depends_on = None

FUNCTION = r"""
CREATE OR REPLACE FUNCTION booking_free_slot_sync() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    c jsonb;
    sched text;
BEGIN
    IF TG_OP <> 'INSERT' THEN
        DELETE FROM booking_free_slot WHERE slot_id = OLD.id;
    END IF;
    IF TG_OP <> 'DELETE' AND NOT NEW.deleted AND NEW.content IS NOT NULL THEN
        c := NEW.content::jsonb;
        sched := c -> 'schedule' ->> 'reference';
        IF c ->> 'status' = 'free' AND sched LIKE 'Schedule/%' AND c ->> 'start' IS NOT NULL THEN
            INSERT INTO booking_free_slot (slot_id, schedule_id, start)
            VALUES (NEW.id, substr(sched, 10), (c ->> 'start')::timestamptz);
        END IF;
    END IF;
    RETURN NULL;
END $$
"""


GEO_INDEX = (
    'CREATE INDEX IF NOT EXISTS "Location_idx_near_gist" ON "Location_idx" USING gist (('
    "cube(ARRAY[cos(radians(nlo::float8)) * cos(radians(nhi::float8)), "
    "cos(radians(nlo::float8)) * sin(radians(nhi::float8)), sin(radians(nlo::float8))])"
    ")) WHERE code = 'near'"
)


def upgrade() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS cube")
    op.execute(GEO_INDEX)
    op.create_table(
        "booking_free_slot",
        sa.Column("slot_id", sa.Text, primary_key=True),
        sa.Column("schedule_id", sa.Text, nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("booking_free_slot_next", "booking_free_slot", ["schedule_id", "start"])
    op.execute(FUNCTION)
    op.execute('CREATE TRIGGER booking_free_slot_sync AFTER INSERT OR UPDATE OR DELETE ON "Slot" '
               "FOR EACH ROW EXECUTE FUNCTION booking_free_slot_sync()")
    op.execute("""
        INSERT INTO booking_free_slot (slot_id, schedule_id, start)
        SELECT s.id, substr((s.content::jsonb) -> 'schedule' ->> 'reference', 10), ((s.content::jsonb) ->> 'start')::timestamptz
        FROM "Slot" s
        WHERE NOT s.deleted AND s.content IS NOT NULL AND (s.content::jsonb) ->> 'status' = 'free'
          AND (s.content::jsonb) -> 'schedule' ->> 'reference' LIKE 'Schedule/%' AND (s.content::jsonb) ->> 'start' IS NOT NULL
    """)


def downgrade() -> None:
    op.execute('DROP INDEX IF EXISTS "Location_idx_near_gist"')
    op.execute('DROP TRIGGER IF EXISTS booking_free_slot_sync ON "Slot"')
    op.execute("DROP FUNCTION IF EXISTS booking_free_slot_sync()")
    op.drop_table("booking_free_slot")
