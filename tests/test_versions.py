"""Per-object high-water marks (domain/versions.py): several versions advanced at once give
the answers and the rows of advancing them one after the other."""

from __future__ import annotations

import random

from sqlalchemy import text

from domain import versions

ROWS = text("SELECT object_id, object_type, event_created, rank, event_id"
            " FROM marketplace_worker.stripe_object_versions ORDER BY object_id")


def _wanted(rnd: random.Random, n: int) -> list[tuple[str, str, int, str, int]]:
    # Few objects, few seconds and ranks: many ties, broken by event ids of mixed case and by
    # the API read's id, as the database's collation orders them.
    ids = ["evt_1Abc", "evt_1abD", "evt_1ABe", "evt_2zz", versions.API_READ_ID, "evt_1Abc"]
    return [(f"in_{rnd.randrange(4)}", "invoice", 100 + rnd.randrange(3), rnd.choice(ids), rnd.randrange(3))
            for _ in range(n)]


def test_advancing_at_once_answers_and_writes_as_one_after_the_other(db):
    rnd = random.Random(7)
    for _ in range(40):
        stored = _wanted(rnd, rnd.randrange(4))
        wanted = _wanted(rnd, rnd.randrange(1, 12))
        results = []
        for at_once in (False, True):
            db.execute(text("TRUNCATE marketplace_worker.stripe_object_versions"))
            for object_id, object_type, created, event_id, rank in stored:
                versions.advance(db, object_id, object_type, created, event_id, rank)
            if at_once:
                answers = versions.advance_all(db, wanted)
            else:
                answers = [versions.advance(db, object_id, object_type, created, event_id, rank)
                           for object_id, object_type, created, event_id, rank in wanted]
            results.append((answers, [tuple(r) for r in db.execute(ROWS)]))
            db.rollback()
        assert results[1] == results[0], (stored, wanted)
    assert versions.advance_all(db, []) == []


def test_a_snapshot_is_stored_in_the_statement_that_advances_its_version_only_when_it_is_newer(db):
    db.execute(text("CREATE TEMP TABLE snapshots (object_id text PRIMARY KEY, note text)"))
    record = versions.advancing(
        "INSERT INTO snapshots SELECT :object_id, :note FROM newer"
        " ON CONFLICT (object_id) DO UPDATE SET note = excluded.note")
    newest = text("SELECT v.event_created || '/' || v.rank || '/' || v.event_id, s.note"
                  " FROM marketplace_worker.stripe_object_versions v JOIN snapshots s USING (object_id)"
                  " WHERE object_id = :id")
    rnd = random.Random(11)
    answers = set()
    for object_id, object_type, created, event_id, rank in _wanted(rnd, 80):
        alone = db.begin_nested()
        expected = versions.advance(db, object_id, object_type, created, event_id, rank)
        alone.rollback()
        answer = versions.advance_writing(db, record, object_id, object_type, created, event_id, rank,
                                          note=f"{created}/{rank}/{event_id}")
        assert answer is expected
        version, note = db.execute(newest, {"id": object_id}).one()
        assert note == version  # the snapshot stored is always the newest version's
        answers.add(answer)
    assert answers == {True, False}
