"""The accounting core: events in, counters and budget usage out.

Plain Python with no I/O and no clock of its own: every call that needs the
time is given it. Its saved form is ``state``'s business (``state.ledger_state`` and
``state.restore``), so the daemon can save it beside file offsets.

What a task is charged, whatever the order its lines are read in:

- A task whose completion or error is read is charged what that line says (its
  ``credits_used``; for a completion without it, its price; for a failed task or an
  error without it, nothing), once: a repeat is a duplicate.
- A task whose outcome is never seen is charged its estimate when it is forgotten
  unfinished (``tasks.ttl`` after its submission, by event time, or past
  ``tasks.max_tasks``), in the period of its submission, under its own project, model
  and user; it is counted in ``expired`` and ``expired_credits``. Its estimate is its
  price by the pricing rules, or the credits of a usage line read for it. It is kept in
  brief as charged (``EST``, in ``evicted``: its owner, flags and estimate, as many as
  ``tasks.max_tasks``): a completion or error read then is counted as usual and charged
  only what it says beyond the estimate (credits never go down: the budget errs toward
  counting), never as an orphan. A finished task the cap pushes out is kept there too,
  so that its repeat is a duplicate.
- A usage tracker's line (no ``event``, ``task_id`` and ``credits``) is an estimate of
  a task, not a second task: joined to the logger's lines of the same task, it adds
  nothing to a task that finishes (its completion's credits and status stand), and is
  the estimate charged if none comes. A usage line of a task not seen yet waits, as a
  completion does, ``tasks.orphan_wait`` of reading time for the logger's lines (one
  that names its project is counted at once); a task known from a usage line alone is
  counted submitted and succeeded with its credits.

So a ledger fed the logger's and a usage tracker's lines of the same tasks, in any
order, has the totals of the logger's lines alone (with the usage line's credits as
the estimate of a task that never finishes).

One job, and long for it: every handler of an event (submission, completion, error,
usage line, expiry, eviction) with its joins, duplicates and charges, so that one
event's way through the accounting reads in one place. What is kept between events,
and the steps the handlers share, are ``book``.
"""

from __future__ import annotations

from typing import Any

from kling_exporter.accounting.book import (
    CLOSED,
    DONE,
    ERR,
    EST,
    FINISHED,
    FLAG_BITS,
    SUB,
    USE,
    Book,
    KeptStatuses,
    estimate_of,
    with_estimate,
)
from kling_exporter.accounting.counters import (
    EXPIRED,
    EXPIRED_CREDITS,
    IN_FLIGHT,
    MODE_SLOT,
    OTHER,
    STATUS_SLOT,
    SUCCEEDED,
    TOUCHED,
    TRACKED,
    VIDEO_SECONDS,
    Histogram,
)
from kling_exporter.accounting.evicted import Owner
from kling_exporter.events import (
    COMPLETED,
    ERROR,
    SUBMITTED,
    UNKNOWN_ERROR,
    UNKNOWN_MODEL,
    USAGE,
    Event,
)
from kling_exporter.model import ReadStats, Record, Task
from kling_exporter.pricing import DEFAULT_DURATION, DEFAULT_KIND, DEFAULT_MODE
from kling_exporter.views import Snapshot

# 2000-01-01T00:00:00Z: an earlier event time is a broken clock (Kling did not exist).
OLDEST_TS = 946684800.0


def _record(event: str, task_id: str, t: Task, ts: float, **more: Any) -> Record:
    return Record(
        event, ts, task_id, t.project, t.user, t.model, t.mode, t.duration, t.audio, t.kind, **more
    )


def fields_of(t: Task) -> Owner:
    """What the record of tasks taken out of the index keeps of a task: all but its
    time and flags."""
    return (t.project, t.user, t.model, t.mode, t.duration, t.audio, t.kind)


def _flags(known: Task | int) -> int:
    return known.flags if isinstance(known, Task) else known


class Ledger(Book):
    """Each event applied to the books (``Book``): the join of submissions with their
    completions and errors, dedup, prices, usage; and what a scrape or a save reads."""

    # -- events ----------------------------------------------------------------------

    def apply(self, event: Event, now: float) -> None:
        """Account one valid event; ``now`` is the time of reading. It stands in for a
        missing timestamp and for an implausible one (more than ``max_clock_ahead`` in the
        future, or before 2000), so one producer's broken clock cannot move the time by
        which other producers' tasks expire or are placed in periods."""
        ts = event.ts
        if ts is None:
            ts = now
        elif ts > now + self.max_ahead:
            ts = now
            self.clamped["ahead"] += 1
        elif ts < OLDEST_TS:
            ts = now
            self.clamped["too_old"] += 1
        if ts > self.last_event_ts:
            self.last_event_ts = ts
        kind = event.type
        task_id: str = event.task_id  # type: ignore[assignment]  # decode_line made it a str
        if kind == SUBMITTED:
            self._submitted(event, task_id, ts)
        elif kind == COMPLETED:
            self._finished(event, task_id, ts, DONE, now)
        elif kind == ERROR:
            if task_id is None:
                self._error_without_task(event, ts)
            else:
                self._finished(event, task_id, ts, ERR, now)
        else:
            self._usage_line(event, task_id, ts, now)

    def _error_without_task(self, e: Event, ts: float) -> None:
        """A task_error with ``"task_id": null``: the submission itself failed (rate
        limit, auth) before there was a task. Counted under its own project and error
        type; there is nothing to join or to deduplicate."""
        task = self._new_task(e, ts, 0)
        counts, _, project, _ = self._route(task.project, task.model)
        error = self.error_labels.get(e.error_type or UNKNOWN_ERROR)
        self.errors[(project, error)] = self.errors.get((project, error), 0) + 1
        credits = e.credits_used or 0.0
        if credits:
            self._charge(counts, task.project, task.user, ts, credits)
        if self.observer is not None:
            usd = credits * self.pricing.usd_per_credit
            self.observer(
                _record("error", "", task, ts, error_type=error, credits=credits, usd=usd)
            )

    def _submitted(self, e: Event, task_id: str, ts: float) -> None:
        tasks = self.tasks
        known = tasks.get(task_id)
        task = self._new_task(e, ts, SUB)
        if known is not None:
            flags = _flags(known)
            if flags & SUB:
                self.duplicates += 1
                return
            # The task finished before its submission was read: count it, not in flight.
            self._count_submission(task)
            tasks[task_id] = flags | SUB
        else:  # the common case, inlined: it runs for every submission
            key = (task.project, task.model)
            counts, project_counts, _, _ = self._routes.get(key) or self._route(*key)
            counts[MODE_SLOT[task.mode]] += 1
            project_counts[IN_FLIGHT] += 1
            project_counts[TOUCHED] = 1
            tasks[task_id] = task
            self.expiry.append((ts, task_id))
            # In flight: _fly(task, 1), inlined (the price key as in _price).
            price = self.pricing.cache.get(
                (task.model, task.mode, task.duration, task.audio, task.kind)
            )
            if price is None:
                price = self._price(task)
            pair = (task.project, task.user)
            flying = self.flight_tasks.get(pair)
            if flying is None:
                self.flight_tasks[pair] = [1, price]
            else:
                flying[0] += 1
                flying[1] += price
        if e.reservation_id is not None:
            self._consume(str(e.reservation_id), ts)
        if self.observer is not None:
            self.observer(_record("submitted", task_id, task, ts))
        if self.waiting:
            parked = self.waiting.pop(task_id, None)
            if parked is not None:
                self._finish_parked(task_id, *parked, orphan=False)

    def _finish_parked(
        self, task_id: str, e: Event, ts: float, read_at: float, orphan: bool
    ) -> None:
        if e.type == USAGE:
            self._usage_line(e, task_id, ts, read_at, alone=orphan)
            return
        how = DONE if e.type == COMPLETED else ERR
        self._finished(e, task_id, ts, how, read_at, orphan=orphan)

    def _finished(
        self, e: Event, task_id: str, ts: float, how: int, now: float, orphan: bool = False
    ) -> None:
        """A completion or an error. One read before its submission waits (``waiting``)
        until the submission comes or ``orphan_wait`` of reading time has passed; then
        (``orphan``) it is counted with what the line itself says. A usage line of the
        task waiting for its submission stands for it."""
        known = self.tasks.get(task_id)
        if known is None:
            known = self._unindexed(task_id, ts)
        if type(known) is Task:
            task, flags = known, known.flags
            key = (task.project, task.model)
            counts, project_counts, project, model = self._routes.get(key) or self._route(*key)
            if not flags & CLOSED:
                project_counts[IN_FLIGHT] -= 1
                project_counts[TOUCHED] = 1
                # Out of flight: _fly(task, -1), inlined (it runs for every finish).
                price = self.pricing.cache.get(
                    (task.model, task.mode, task.duration, task.audio, task.kind)
                )
                pair = (task.project, task.user)
                flying = self.flight_tasks.get(pair)
                if flying is not None and flying[0] == 1:
                    del self.flight_tasks[pair]
                elif flying is not None:
                    flying[0] -= 1
                    flying[1] -= self._price(task) if price is None else price
        else:
            flags = known or 0  # type: ignore[assignment]
            if not self._counted_alone(e, task_id, ts, now, flags, orphan):
                return
            task = self._new_task(e, ts, 0)
            counts, _, project, model = self._route(task.project, task.model)
        if how == DONE:
            credits = self._completed(e, task, counts, model, type(known) is Task)
        else:
            credits = self._errored(e, project)
        if flags & EST:  # charged its estimate when forgotten: what it says beyond that
            credits = max(0.0, credits - estimate_of(flags))
        if credits:
            self._charge(counts, task.project, task.user, ts, credits)
        if known is None:
            self._remember(task_id, flags | how, ts)
        else:
            self.tasks[task_id] = flags & FLAG_BITS | how
        if self.observer is not None:
            self.observer(self._finish_record(e, task_id, task, ts, how, credits))

    def _unindexed(self, task_id: str, ts: float) -> Task | int | None:
        """A task the index does not hold for a terminal event of it: the one its usage
        line stands for, if one waits; else one back from the record of those taken out
        of the index (``_from_record``); else None."""
        if self.waiting:
            known = self._joined_to_usage(task_id)
            if known is not None:
                return known
        return self._from_record(task_id, ts) if self.evicted else None

    def _from_record(self, task_id: str, ts: float) -> Task | int | None:
        """A task taken out of the index (by its cap, or unfinished at its TTL), back in
        it from its brief record (``evicted``): a Task with its fields and the flags with
        the estimate it was charged if it was unfinished, its flags if it had finished;
        None if the record does not hold it."""
        found = self.evicted.take(task_id)
        if found is None:
            return None
        owner, flags = found
        value: Task | int
        if owner is not None:
            value = Task(*owner, ts, flags)
        elif flags & FINISHED:
            value = flags  # what comes now repeats it
        else:  # charged, its fields not kept (the record's table was full)
            fields = (OTHER, None, UNKNOWN_MODEL, DEFAULT_MODE, DEFAULT_DURATION, False)
            value = Task(*fields, DEFAULT_KIND, ts, flags)
        self._remember(task_id, value, ts)
        return value

    def _joined_to_usage(self, task_id: str) -> Task | int | None:
        """The task of a terminal event of a task not seen: the one its usage line, if
        one waits, stands for the submission of (the two are not left to wait side by
        side for the logger's submission: one task is counted, as a usage line and its
        completion)."""
        parked = self.waiting.get(task_id)
        if parked is not None and parked[0].type == USAGE:
            del self.waiting[task_id]
            self._usage_as_submission(parked[0], task_id, parked[1])
            return self.tasks.get(task_id)
        return None

    def _counted_alone(
        self, e: Event, task_id: str, ts: float, now: float, flags: int, orphan: bool
    ) -> bool:
        """Whether a terminal event without an open submission is counted now, on what
        the line itself says: not if it repeats a finish (the first terminal event wins;
        a later one, even of the other kind, is a duplicate), nor while its submission
        may still come (another file, another host) to say whose it is."""
        if flags & FINISHED or (self.waiting and task_id in self.waiting):
            self.duplicates += 1
            return False
        if not orphan and self.orphan_wait > 0 and not e.own_project:
            self.waiting[task_id] = (e, ts, now)  # a line that names its project is not
            return False
        self.orphaned += 1
        return True

    def _completed(
        self, e: Event, task: Task, counts: list[float], model: str, submitted: bool
    ) -> float:
        """Count a completion; its credits: what the line says, else the estimate (none
        for a failed task)."""
        status = e.status or "succeed"
        counts[STATUS_SLOT[status]] += 1
        credits = e.credits_used
        if credits is None and status != "failed":
            credits = self.pricing.cache.get(
                (task.model, task.mode, task.duration, task.audio, task.kind)
            )
            if credits is None:
                credits = self._price(task)
        if status == "succeed":
            # Seconds of video made: succeeded videos whose length is known (from the
            # submission, or from the line itself), never a guessed default.
            if task.kind == "video" and (submitted or e.duration is not None):
                counts[VIDEO_SECONDS] += task.duration
            if e.elapsed_sec is not None:
                hist = self.generation.get(model)
                if hist is None:
                    hist = self.generation[model] = Histogram()
                hist.observe(e.elapsed_sec)
        return 0.0 if credits is None else credits  # a failed task costs what it says

    def _errored(self, e: Event, project: str) -> float:
        """Count an error; its credits (what the line says, else none)."""
        error = self.error_labels.get(e.error_type or UNKNOWN_ERROR)
        errors, ekey = self.errors, (project, error)
        errors[ekey] = errors.get(ekey, 0) + 1
        return e.credits_used or 0.0

    def _finish_record(
        self, e: Event, task_id: str, task: Task, ts: float, how: int, credits: float
    ) -> Record:
        """What the observer (the CSV export) is told of a completion or an error."""
        usd = credits * self.pricing.usd_per_credit
        if how == DONE:
            return _record(
                "completed",
                task_id,
                task,
                ts,
                status=e.status or "succeed",
                elapsed=e.elapsed_sec,
                credits=credits,
                usd=usd,
            )
        return _record(
            "error",
            task_id,
            task,
            ts,
            error_type=e.error_type or UNKNOWN_ERROR,
            credits=credits,
            usd=usd,
        )

    def _usage_line(
        self, e: Event, task_id: str, ts: float, now: float, alone: bool = False
    ) -> None:
        """A simple tracker's line: an estimate of a task, joined to the logger's lines
        of it (see the module's docstring). Of a task not seen yet, it waits for them in
        ``waiting`` as a completion does (not one that names its project); then
        (``alone``) it is counted as one submitted and succeeded task with its credits."""
        known = self.tasks.get(task_id)
        if known is None and self.evicted:
            known = self._from_record(task_id, ts)
        if known is None:
            parked = self.waiting.get(task_id) if self.waiting else None
            if parked is not None and parked[0].type == USAGE:
                self.duplicates += 1
            elif parked is not None:  # its completion waits: this line is its submission
                self._usage_as_submission(e, task_id, ts)
            elif not alone and self.orphan_wait > 0 and not e.own_project:
                self.waiting[task_id] = (e, ts, now)
            else:
                self._usage_alone(e, task_id, ts)
            return
        flags = _flags(known)
        if flags & USE:
            self.duplicates += 1
        elif type(known) is Task:
            if flags & CLOSED:
                known.flags = flags | USE
            else:  # its estimate, until its completion says better
                known.flags = with_estimate(flags | USE, e.credits or 0.0)
        else:  # finished: its completion stands
            if not flags & SUB:  # counted without its submission: this line is one
                task = self._new_task(e, ts, 0)
                self._count_submission(task)
                if self.observer is not None:
                    self.observer(_record("submitted", task_id, task, ts))
            self.tasks[task_id] = flags | SUB | USE

    def _usage_as_submission(self, e: Event, task_id: str, ts: float) -> None:
        """A usage line stands for the submission of a task whose completion came
        without one: the task is counted submitted with what the line says, and the
        completion (waiting, or being counted) then joins it."""
        self._submitted(e, task_id, ts)
        known = self.tasks[task_id]
        if isinstance(known, Task):
            known.flags |= USE
        else:
            self.tasks[task_id] = known | USE

    def _usage_alone(self, e: Event, task_id: str, ts: float) -> None:
        """A usage line no logger's line joined: one submitted and succeeded task."""
        task = self._new_task(e, ts, 0)
        counts, _, _, _ = self._count_submission(task)
        counts[SUCCEEDED] += 1
        # A usage line names no clip length unless it says so.
        if task.kind == "video" and e.duration is not None:
            counts[VIDEO_SECONDS] += task.duration
        if e.credits:
            self._charge(counts, task.project, task.user, ts, e.credits)
        self._remember(task_id, SUB | DONE | USE, ts)
        if self.observer is not None:
            self.observer(_record("submitted", task_id, task, ts))
            credits = e.credits or 0.0
            self.observer(
                _record(
                    "completed",
                    task_id,
                    task,
                    ts,
                    status="succeed",
                    elapsed=e.elapsed_sec,
                    credits=credits,
                    usd=credits * self.pricing.usd_per_credit,
                )
            )

    # -- housekeeping ----------------------------------------------------------------

    def expire(self, now: float, reservations: bool = True, aged: float = float("inf")) -> int:
        """Count the terminal events that waited long enough for their submission, forget
        old tasks (``expire_tasks``, at most ``aged`` by the TTL) and usage of periods
        that have ended, and (with ``reservations``) what reservations used that none can
        be live for."""
        self.settle_waiting(now - self.orphan_wait)
        dropped = self.expire_tasks(now, aged=aged)
        self._prune_usage(now)
        if reservations:
            self._prune_consumed(now)
        return dropped

    def settle_waiting(self, read_before: float = float("inf")) -> None:
        """Count as orphans the waiting terminal events read before ``read_before`` (all of
        them by default: the end of a one-off read of the logs), and usage lines on their
        own."""
        waiting = self.waiting
        while waiting:
            task_id = next(iter(waiting))
            e, ts, read_at = waiting[task_id]
            if read_at >= read_before and len(waiting) <= self.config.tasks.max_tasks:
                break
            del waiting[task_id]
            self._finish_parked(task_id, e, ts, read_at, orphan=True)

    def end_of_logs(self, now: float) -> None:
        """A one-off read (the reports) has read every file: what waits for its
        submission never gets it, and a task still unfinished that is older than the TTL
        before the newest event is charged its estimate, as the daemon would have charged
        it. A task that finishes later in the same files is never charged an estimate;
        the task index is not capped here (the reports keep every task they read)."""
        self.settle_waiting()
        self.expire_tasks(now, cap=False)

    def expire_tasks(
        self, now: float, by_ttl: bool = True, cap: bool = True, aged: float = float("inf")
    ) -> int:
        """Forget tasks older than the TTL (by event time; not ``by_ttl`` while a backlog
        is read: lines of another file may still join them; at most ``aged`` of them, the
        rest at the next call) or past the size cap (``cap``). An unfinished task
        forgotten here leaves the in-flight gauge and is charged its estimate
        (``_charge_estimate``), and is kept in brief as charged (``EST``, in ``evicted``)
        for a completion that may still come; so is a finished one the cap pushes out,
        for a repeat. The newest event time may not run ahead of the time of reading (a
        state saved by a version that let a broken clock move it is mended here)."""
        if self.last_event_ts > now + self.max_ahead:
            self.last_event_ts = now
        max_tasks = self.config.tasks.max_tasks
        if len(self.waiting) > max_tasks:
            self.settle_waiting(float("-inf"))
        ttl = self.config.tasks.ttl_seconds
        cutoff = max(self.last_event_ts, 0.0) - ttl if by_ttl else float("-inf")
        limit = max_tasks if cap else float("inf")
        expiry, tasks = self.expiry, self.tasks
        dropped = 0
        while expiry and ((expiry[0][0] < cutoff and aged > 0) or len(tasks) > limit):
            ts, task_id = expiry.popleft()
            aged -= 1  # the cap's work, counted too, needs no bound: it frees memory
            value = tasks.get(task_id)
            if value is None:
                continue
            if type(value) is Task:
                if value.ts != ts:
                    continue
                flags = value.flags
                forgotten = ts < cutoff  # aged out finished: nothing more can come
                if not flags & CLOSED:
                    estimate = self._charge_estimate(task_id, value)
                    flags = with_estimate(flags | EST, estimate)
                    forgotten = False  # a completion may still come, whatever took it out
                if not forgotten:
                    self.evicted.add(task_id, fields_of(value), flags, ts >= cutoff)
            elif ts >= cutoff:  # pushed out by the cap, not aged out: kept for a repeat
                self.evicted.add(task_id, None, value)  # type: ignore[arg-type]  # flags
            del tasks[task_id]
            dropped += 1
        return dropped

    def _charge_estimate(self, task_id: str, t: Task) -> float:
        """Charge a task forgotten unfinished its estimate (a usage line's credits, else
        its price), in the period of its submission, under its own project, model and
        user; returns the estimate."""
        estimate = estimate_of(t.flags) if t.flags & USE else self._price(t)
        counts, project_counts, _, _ = self._route(t.project, t.model, count=False)
        project_counts[IN_FLIGHT] -= 1
        project_counts[EXPIRED] += 1
        project_counts[TOUCHED] = 1
        self._fly(t, -1)
        if estimate:
            self._charge(counts, t.project, t.user, t.ts, estimate)
        project_counts[EXPIRED_CREDITS] += estimate
        if self.observer is not None:
            usd = estimate * self.pricing.usd_per_credit
            self.observer(_record("expired", task_id, t, t.ts, credits=estimate, usd=usd))
        return estimate

    # -- reading ---------------------------------------------------------------------

    def snapshot(
        self,
        now: float,
        reading: ReadStats | None = None,
        counted: bool = True,
        statuses: KeptStatuses | None = None,
    ) -> Snapshot:
        """Everything a scrape shows of the ledger, with the reader's counts. Without
        ``counted``, the views of the counters are left empty, for a scrape that reads
        them from a ``Tracker`` instead; the budget statuses come from ``statuses``
        where given."""
        reading = reading or ReadStats()
        views: dict[str, Any] = (
            {
                "submitted": self.submitted,
                "completed": self.completed,
                "credits": self.credits,
                "usd": self.usd,
                "video_seconds": self.video_seconds,
                "in_flight": self.in_flight,
                "expired": self.expired,
                "expired_credits": self.expired_credits,
            }
            if counted
            else {name: {} for name in TRACKED}
        )
        return Snapshot(
            lines_read=reading.lines,
            bytes_read=reading.bytes,
            invalid=reading.invalid.copy(),
            errors=self.errors.copy(),
            generation={m: (h.cumulative(), h.sum) for m, h in self.generation.items()},
            **views,
            budgets=self.budget_statuses(now) if statuses is None else statuses.of(self, now),
            duplicates=self.duplicates,
            last_event_ts=self.last_event_ts,
            label_overflow={
                "project": self.project_labels.overflow,
                "model": self.model_labels.overflow,
                "error_type": self.error_labels.overflow,
                "user": self.user_labels.overflow,
            },
            tasks_tracked=len(self.tasks),
            tasks_limit=self.config.tasks.max_tasks,
            tasks_evicted=self.evicted.total,
            timestamps_clamped=self.clamped.copy(),
            awaiting_submission=len(self.waiting),
            orphaned=self.orphaned,
        )
