"""The transition table: legal paths work, anything else is refused and changes nothing (h11's habit)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from glance_migrator.errors import IllegalTransition, StateDBError, UsageError
from glance_migrator.glance import GlanceUnavailable
from glance_migrator.models import ImageRow
from glance_migrator.reports import report
from glance_migrator.state import PATHS, TERMINAL, State, Strategy, check_transition, next_state, transitions
from glance_migrator.statedb import INSERT_BATCH, LeaseLost, LeaseOwner, StateDB


def _row(image_id: str, state: State = State.PENDING) -> tuple[ImageRow, str | None]:
    return (
        ImageRow(
            image_id=image_id,
            name=f"img-{image_id[:4]}",
            status="active",
            size=1,
            checksum="c",
            os_hash_algo="sha512",
            os_hash_value="h",
            stores="old",
            strategy=str(Strategy.COPY_IMAGE),
            state=str(state),
            attempts=0,
        ),
        None,
    )


@pytest.fixture
def db(state_url: str) -> Iterator[StateDB]:
    """A new state DB, once on SQLite and once on PostgreSQL."""
    db = StateDB.open(state_url)
    yield db
    db.close()


def test_every_path_ends_done_and_every_step_is_legal() -> None:
    for strategy, path in PATHS.items():
        assert path[0] == State.PENDING and path[-1] == State.DONE
        for a, b in itertools.pairwise(path):
            assert next_state(strategy, a) == b
            check_transition(strategy, a, b)
        assert next_state(strategy, State.DONE) is None


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (State.PENDING, State.COPIED),  # skipping a step
        (State.COPIED, State.COPY_REQUESTED),  # going back
        (State.DONE, State.FAILED),  # leaving a terminal state
        (State.SKIPPED, State.PENDING),
        (State.COPY_REQUESTED, State.SKIPPED),  # only a non-started image can be skipped
        (State.FAILED, State.DONE),  # retry goes back to the failed step only
    ],
)
def test_illegal_transition_is_refused_and_changes_nothing(db: StateDB, current: State, target: State) -> None:
    image_id = "11111111-1111-1111-1111-111111111111"
    row, _ = _row(image_id, current)
    if current == State.FAILED:
        row.failed_at = str(State.COPIED)
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [(row, None)])
    events_before = db.events(run.id)
    with pytest.raises(IllegalTransition):
        db.transition(run.id, image_id, target, "should not happen")
    after = db.image(run.id, image_id)
    assert after is not None and after.state == current
    assert [e.id for e in db.events(run.id)] == [e.id for e in events_before]


def test_failure_and_retry_return_to_the_failed_step(db: StateDB) -> None:
    image_id = "22222222-2222-2222-2222-222222222222"
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(image_id)])
    db.transition(run.id, image_id, State.COPY_REQUESTED, "ok")
    db.transition(run.id, image_id, State.COPIED, "ok")
    db.transition(run.id, image_id, State.FAILED, "boom", error="boom", error_kind="glance")
    row = db.image(run.id, image_id)
    assert row is not None and row.failed_at == State.COPIED and row.error == "boom"
    db.finish_run_if_complete(run.id)
    assert db.get_run(run.id).finished_at is not None
    row = db.requeue_failed(run.id, image_id)
    assert row.state == State.COPIED and row.error is None and row.failed_at is None
    assert db.get_run(run.id).finished_at is None  # the run is open again for `run --resume`
    states = [(e.from_state, e.to_state) for e in db.events(run.id, image_id)]
    assert states == [
        (None, "pending"),
        ("pending", "copy-requested"),
        ("copy-requested", "copied"),
        ("copied", "failed"),
        ("failed", "copied"),
    ]


def test_requeue_refuses_an_image_that_did_not_fail(db: StateDB) -> None:
    image_id = "33333333-3333-3333-3333-333333333333"
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(image_id)])
    with pytest.raises(UsageError, match="only failed or blocked"):
        db.requeue_failed(run.id, image_id)


def test_a_second_run_is_refused_while_one_is_unfinished(db: StateDB) -> None:
    db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row("44444444-4444-4444-4444-444444444444")])
    with pytest.raises(UsageError, match="--resume"):
        db.create_run("old", "new", Strategy.COPY_IMAGE, None, [])


def test_leases_keep_two_runners_apart_and_a_dead_runners_lease_is_taken_over(db: StateDB) -> None:
    ids = ["55555555-5555-5555-5555-55555555555" + str(i) for i in range(2)]
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(i) for i in ids])
    a, b = LeaseOwner.me(), LeaseOwner("otherhost", 1, "x")
    first = db.claim_next(run.id, a, set())
    second = db.claim_next(run.id, a, set())
    assert first and second and first.image_id != second.image_id
    assert db.claim_next(run.id, b, set()) is None  # both held by a live runner
    with pytest.raises(Exception, match="lease"):
        db.transition(run.id, first.image_id, State.COPY_REQUESTED, "x", owner=b)
    # A runner on this host whose process is gone: its leases are free at once, without waiting for expiry.
    dead = LeaseOwner(a.host, 2**22 + 12345, "dead")
    db.release(run.id, first.image_id, a)
    assert db.claim_next(run.id, dead, set()) is not None
    taken = db.claim_next(run.id, a, set())
    assert taken is not None and taken.image_id == first.image_id


def test_transition_table_lists_each_edge_once() -> None:
    edges = transitions(Strategy.COPY_IMAGE)
    assert len(edges) == len(set(edges))
    for a, b in edges:
        check_transition(Strategy.COPY_IMAGE, a, b, failed_at=b if a in (State.FAILED, State.BLOCKED) else None)
    check_transition(Strategy.COPY_IMAGE, State.FAILED, State.PENDING, failed_at=State.COPY_REQUESTED)
    check_transition(Strategy.COPY_IMAGE, State.COPIED, State.BLOCKED)  # only the step that removes the old copy
    with pytest.raises(IllegalTransition):
        check_transition(Strategy.COPY_IMAGE, State.COPY_REQUESTED, State.BLOCKED)
    check_transition(Strategy.COPY_IMAGE, State.FAILED, State.COPIED, failed_at=State.COPIED)
    with pytest.raises(IllegalTransition):  # a failed wait for the copy restarts the copy, not the wait
        check_transition(Strategy.COPY_IMAGE, State.FAILED, State.COPY_REQUESTED, failed_at=State.COPY_REQUESTED)
    assert all(t in TERMINAL for t in (State.DONE, State.FAILED, State.SKIPPED))


def _ids(n: int) -> list[str]:
    return [f"66666666-6666-4666-8666-{i:012d}" for i in range(n)]


def test_claims_go_in_run_order_skip_held_rows_and_take_a_dead_holders_row_first(db: StateDB) -> None:
    ids = _ids(5)
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(i) for i in ids])
    me, other, dead = LeaseOwner.me(), LeaseOwner("otherhost", 1, "x"), LeaseOwner(LeaseOwner.me().host, 2**22 + 7, "d")
    assert [db.claim_next(run.id, x, set()).image_id for x in (other, dead)] == ids[:2]  # type: ignore[union-attr]
    # ids[0] is held by a live runner elsewhere, ids[1] by a process of this host that is gone: taken first
    assert db.claim_next(run.id, me, set()).image_id == ids[1]  # type: ignore[union-attr]
    assert db.claim_next(run.id, me, {ids[2]}).image_id == ids[3]  # type: ignore[union-attr]
    # what a runner with nothing to claim waits for: every unfinished image its busy workers do not hold, among
    # them one its own process holds without a worker on it (a release that failed): it waits for that lease to lapse
    assert [r.image_id for r in db.leased_by_others(run.id, [me])] == [ids[0], ids[2], ids[4]]
    assert [r.image_id for r in db.leased_by_others(run.id, [me.of_worker("w2")])] == ids
    db.transition(run.id, ids[3], State.COPY_REQUESTED, "x", owner=me)
    db.transition(run.id, ids[3], State.FAILED, "x", owner=me)
    db.release(run.id, ids[3], me)
    assert db.claim_next(run.id, me, set()).image_id == ids[2]  # type: ignore[union-attr]  # failed rows wait
    assert db.claim_next(run.id, me, set()).image_id == ids[4]  # type: ignore[union-attr]
    assert db.claim_next(run.id, me, set()) is None


def _plans_of(db: StateDB, action: Callable[[], object]) -> list[tuple[str, str]]:
    """Each SELECT on images that `action` sent, with its query plan (on PostgreSQL with sequential scans priced out:
    its planner rightly prefers a scan of 3 rows)."""
    statements: list[tuple[str, object]] = []
    listen = lambda conn, cursor, statement, params, context, many: statements.append((statement, params))  # noqa: E731
    sa.event.listen(db.engine, "before_cursor_execute", listen)
    try:
        action()
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", listen)
    selects = [(sql, params) for sql, params in statements if sql.lstrip().upper().startswith("SELECT")
               and "FROM images" in sql]  # fmt: skip
    sqlite = db.engine.dialect.name == "sqlite"
    with db.engine.connect() as conn:
        plans = []
        if not sqlite:
            conn.exec_driver_sql("SET enable_seqscan = off")
        for statement, params in selects:
            sql = statement.removesuffix(" FOR UPDATE SKIP LOCKED")  # (EXPLAIN alone takes no lock)
            explain = "EXPLAIN QUERY PLAN " if sqlite else "EXPLAIN "
            rows = conn.exec_driver_sql(explain + sql, params)  # type: ignore[arg-type]
            plans.append((sql, " ".join(str(step[-1]) for step in rows)))
    return plans


def test_claims_and_lease_lookups_read_an_index_not_every_row(db: StateDB) -> None:
    """Taking the next image costs the same at 50 rows and 500,000: the plan for the claim's queries searches the
    claim index (unfinished rows in run order) and the lease index, never the whole table."""
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(i) for i in _ids(3)])

    def claim() -> None:
        db.claim_next(run.id, LeaseOwner.me(), {"nothing"})
        db.leased_by_others(run.id, [LeaseOwner.me()])

    plans = [plan for _sql, plan in _plans_of(db, claim)]
    assert len(plans) == 3, plans
    assert "ix_images_claim" in plans[0], plans
    if db.engine.dialect.name == "sqlite":
        assert "USING INDEX ix_images_claim" in plans[0] and "TEMP B-TREE" not in plans[0], plans
        assert "ix_images_lease_owner" in plans[1], plans  # the live leases, for a dead holder's
        assert "USING INDEX ix_images_claim" in plans[2], plans  # waiting: the first 100 unfinished rows, in order
    else:  # PostgreSQL may serve the lease lookups from either index: both avoid reading the table whole
        assert "Sort" not in plans[0], plans  # read in index order: the first free row ends the scan
        assert not any("Seq Scan" in plan for plan in plans), plans


def test_status_counts_and_problems_read_the_state_index_not_every_row(db: StateDB) -> None:
    """`status` at 100,000 images: the counts per state come from the (run_id, state) index alone, and the failed,
    blocked and skipped images are looked up in it, not found by reading every row of the run."""
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(i) for i in _ids(3)])
    db.transition(run.id, _ids(3)[1], State.SKIPPED, "not active")
    plans = _plans_of(db, lambda: report(db, run.id))
    (counts,) = [plan for sql, plan in plans if "GROUP BY" in sql]
    (problems,) = [plan for sql, plan in plans if "state IN" in sql]
    assert "ix_images_run_state" in counts and "ix_images_run_state" in problems, plans
    if db.engine.dialect.name == "sqlite":
        assert "COVERING INDEX ix_images_run_state" in counts, plans  # the rows themselves are never read
    else:
        assert "Seq Scan" not in counts + problems, plans


def test_an_image_of_several_gib_is_recorded_as_it_is(db: StateDB) -> None:
    row, _ = _row(_ids(1)[0])
    row.size = 5 * 2**30 + 1  # 64-bit: a 32-bit INTEGER column refuses it on PostgreSQL
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [(row, None)])
    assert db.images(run.id)[0].size == 5 * 2**30 + 1


def _lapse(db: StateDB, run_id: int, image_id: str) -> None:
    """What a runner paused past its lease (Ctrl-Z, a frozen VM) leaves: a lease whose time ran out."""
    with db.session() as s:
        s.execute(
            sa.update(ImageRow)
            .where(ImageRow.run_id == run_id, ImageRow.image_id == image_id)
            .values(lease_expires=sa.func.now() - sa.text("interval '1 hour'")
                    if db.engine.dialect.name == "postgresql" else sa.text("datetime('now', '-1 hour')"))
        )  # fmt: skip


def test_a_lease_belongs_to_one_worker_and_a_worker_that_lost_it_finds_out_before_it_records(db: StateDB) -> None:
    """Two threads of one process are two holders: after a pause past the lease, the worker that took the image
    over holds it, and the paused one is told (LeaseLost) before it renews or records anything."""
    (image_id,) = _ids(1)
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(image_id)])
    process = LeaseOwner.me()
    w1, w2 = process.of_worker("worker-1"), process.of_worker("worker-2")
    assert db.claim_next(run.id, w1, set()) is not None
    assert db.claim_next(run.id, w2, set()) is None  # held by its sibling
    db.hold(run.id, image_id, w1)  # renewing our own lease
    _lapse(db, run.id, image_id)
    taken = db.claim_next(run.id, w2, set())
    assert taken is not None and taken.image_id == image_id and taken.lease_owner == str(w2)
    with pytest.raises(LeaseLost):
        db.hold(run.id, image_id, w1)
    with pytest.raises(LeaseLost):
        db.transition(run.id, image_id, State.COPY_REQUESTED, "from the paused worker", owner=w1)
    assert [e.to_state for e in db.events(run.id)] == ["pending"]
    db.release(run.id, image_id, w1)  # letting go of what is no longer ours changes nothing
    row = db.image(run.id, image_id)
    assert row is not None and row.lease_owner == str(w2)
    # A lease that lapsed while nobody took it is still ours: nobody else worked on the image.
    _lapse(db, run.id, image_id)
    db.hold(run.id, image_id, w2)
    db.transition(run.id, image_id, State.COPY_REQUESTED, "ok", owner=w2)


def test_status_sees_who_holds_what_and_which_leases_are_stale(db: StateDB) -> None:
    ids = _ids(3)
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(i) for i in ids])
    live, gone = LeaseOwner("otherhost", 1, "x", "worker-3"), LeaseOwner(LeaseOwner.me().host, 2**22 + 7, "d")
    for owner in (live, live.of_worker("worker-4"), gone):
        db.claim_next(run.id, owner, set())
    _lapse(db, run.id, ids[1])
    leases = db.leases(run.id)
    assert [(lease.image_id, lease.holder, lease.stale) for lease in leases] == [
        (ids[0], live, False),
        (ids[1], live.of_worker("worker-4"), True),  # lapsed
        (ids[2], gone, True),  # a process of this host that is gone
    ]
    assert all(lease.since is not None and lease.since <= lease.now for lease in leases)


def test_concurrent_claims_never_hand_one_image_to_two_workers(db: StateDB) -> None:
    """Runners on several hosts claim at the same time: each image goes to exactly one worker (PostgreSQL: row
    locks that others skip; SQLite: one writer at a time)."""
    ids = _ids(60)
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, [_row(i) for i in ids])
    taken: dict[str, list[str]] = {}
    start = threading.Barrier(8)

    def worker(n: int) -> None:
        owner = LeaseOwner(f"host{n % 4}", 100 + n, "t", f"worker-{n}")
        start.wait()
        while (row := db.claim_next(run.id, owner, set())) is not None:
            taken.setdefault(row.image_id, []).append(str(owner))
            db.transition(run.id, row.image_id, State.SKIPPED, "claimed", owner=owner)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == ids
    assert {image: owners for image, owners in taken.items() if len(owners) > 1} == {}
    assert len({owners[0] for owners in taken.values()}) > 1  # the claims were spread, not serialised by luck


def test_a_run_of_several_insert_batches_is_recorded_whole_in_order_and_totalled(db: StateDB) -> None:
    ids = [f"66666666-6666-4666-8666-{i:012d}" for i in range(2 * INSERT_BATCH + 7)]
    rows = [_row(i, State.SKIPPED if n % 3 == 0 else State.PENDING) for n, i in enumerate(ids)]
    rows = [(row, f"reason {n}" if row.state == State.SKIPPED else None) for n, (row, _) in enumerate(rows)]
    rows[5][0].state, rows[5][0].failed_at, rows[5][0].size = str(State.BLOCKED), str(State.COPIED), None
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, rows)
    recorded = db.images(run.id)
    assert [row.image_id for row in recorded] == ids and [row.position for row in recorded] == list(range(len(ids)))
    assert all(row.created_at is not None and row.attempts == 0 and not row.os_hidden for row in recorded)
    events = db.events(run.id)
    assert [(e.image_id, e.to_state, e.message) for e in events] == [
        (row.image_id, row.state, reason) for row, reason in rows
    ]
    totals = db.totals(run.id)
    finished = [row for row in recorded if row.state in TERMINAL]
    assert (totals.images, totals.finished) == (len(ids), len(finished))
    assert (totals.bytes, totals.finished_bytes) == (len(ids) - 1, sum(row.size or 0 for row in finished))
    assert totals.retryable == {ids[5]}


def test_a_run_whose_listing_fails_part_way_leaves_nothing(db: StateDB) -> None:
    """create_run records discovery's rows as Glance lists them, batch by batch in one transaction: Glance failing
    after a batch and a half went in leaves no run and no row, and a new run can start."""
    ids = [f"88888888-8888-4888-8888-{i:012d}" for i in range(INSERT_BATCH + INSERT_BATCH // 2)]

    def listing() -> Iterator[tuple[ImageRow, str | None]]:
        yield from (_row(i) for i in ids)
        raise GlanceUnavailable("Glance keeps failing: 503 on the next page")

    with pytest.raises(GlanceUnavailable):
        db.create_run("old", "new", Strategy.COPY_IMAGE, None, listing())
    assert not db.has_runs()
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(ImageRow)) == 0
    run = db.create_run("old", "new", Strategy.COPY_IMAGE, None, (_row(i) for i in ids))
    assert [row.image_id for row in db.images(run.id)] == ids


def test_a_run_that_cannot_be_recorded_whole_leaves_nothing(db: StateDB) -> None:
    ids = [f"77777777-7777-4777-8777-{i:012d}" for i in range(INSERT_BATCH + 2)]
    rows = [_row(i) for i in [*ids, ids[0]]]  # the same image twice: the last batch fails
    with pytest.raises(StateDBError):
        db.create_run("old", "new", Strategy.COPY_IMAGE, None, rows)
    assert not db.has_runs()
    with db.reading() as s:
        assert s.scalar(sa.select(sa.func.count()).select_from(ImageRow)) == 0
