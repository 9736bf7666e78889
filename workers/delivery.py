"""The callbacks worker's delivery loop: one asyncio loop per callbacks process, with up to
CALLBACK_MAX_IN_FLIGHT attempts in flight, none of which holds a thread while it waits.

It claims due attempts from the database (events.claim), fairly across endpoints, whenever it is
woken (a `send_callback` message, a finished attempt) and every CALLBACK_DISPATCH_INTERVAL. Per
endpoint at most CALLBACK_ENDPOINT_MAX_IN_FLIGHT attempts are in flight; an attempt claimed
beyond that is put back for a second without counting. An open circuit breaker (endpoints.py)
turns due attempts into recorded "not sent" attempts without a network call. Outcomes are written
in batches by one database thread (events.record), so a process holds one PostgreSQL connection
for all of this, and a database outage only delays the writes: a claim that is never recorded is
sent again when its lease runs out.
"""

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections
from django.utils import timezone

from . import callbacks, endpoints, events

logger = logging.getLogger(__name__)

FLUSH_EVERY = 0.05  # seconds between writes of outcomes
FLUSH_SIZE = 500
MIN_POLL_GAP = 0.01  # wake-ups closer than this share one claim
DB_RETRY_SECONDS = 1.0


class DeliveryLoop:
    """Runs in a thread of its own; start() and stop() are called from the worker's main thread."""

    def __init__(self, max_in_flight=None, per_endpoint=None, interval=None):
        self.max_in_flight = max_in_flight or settings.CALLBACK_MAX_IN_FLIGHT
        self.per_endpoint = per_endpoint or settings.CALLBACK_ENDPOINT_MAX_IN_FLIGHT
        self.interval = interval or settings.CALLBACK_DISPATCH_INTERVAL
        self.in_flight = Counter()  # endpoint -> attempts in flight
        self.origins = {}  # endpoint -> the URL origins seen for it (events.origin)
        self.probing = set()  # endpoints whose probe is in flight or not yet recorded
        self.outcomes = []
        self.sent = 0  # attempts that went out (for benchmarks and tests)
        self._tasks = set()
        self._thread = None
        self._loop = None
        self._wakeup = None
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._db = ThreadPoolExecutor(1, thread_name_prefix="callback-db")

    # --- control, from other threads ---

    def start(self):
        self._thread = threading.Thread(target=self._run, name="callback-delivery", daemon=True)
        self._thread.start()
        self._started.wait(10)
        return self

    def wake(self):
        """Look for due attempts now (thread-safe)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:
                pass  # closing

    def stop(self, timeout=None):
        """Stop claiming, let attempts in flight finish (they end within CALLBACK_TIMEOUT), record
        them, and return. What is still unrecorded after `timeout` is sent again after its lease."""
        self._stopping.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else settings.CALLBACK_TIMEOUT + 5)
        self._db.shutdown(wait=False)

    # --- the loop ---

    def _run(self):
        while not self._stopping.is_set():
            try:
                asyncio.run(self._main())
            except Exception:
                logger.exception("the callback delivery loop failed; starting it again")
                self._started.set()
                time.sleep(DB_RETRY_SECONDS)

    async def _main(self):
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._started.set()
        async with callbacks.async_session() as session:
            writer = asyncio.create_task(self._write_forever())
            last_poll = 0.0
            while not self._stopping.is_set():
                gap = MIN_POLL_GAP - (time.monotonic() - last_poll)
                if gap > 0:
                    await asyncio.sleep(gap)
                self._wakeup.clear()
                last_poll = time.monotonic()
                if await self._claim_and_send(session):
                    continue  # there may be more due: look again at once
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self.interval)
                except TimeoutError:
                    pass
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=settings.CALLBACK_TIMEOUT + 1)
            writer.cancel()
            await self._write()
        await self._loop.run_in_executor(self._db, connections.close_all)

    async def _db_call(self, function, *args):
        def call():
            close_old_connections()  # drops a connection a database restart broke
            try:
                return function(*args)
            finally:
                close_old_connections()

        return await self._loop.run_in_executor(self._db, call)

    def _busy_origins(self):
        busy = {key for key, count in self.in_flight.items() if count >= self.per_endpoint} | self.probing
        return [origin for key in busy for origin in self.origins.get(key, ())]

    async def _claim_and_send(self, session):
        """One claim; returns True when it filled all the room there was (more may be due)."""
        room = self.max_in_flight - len(self._tasks)
        if room <= 0:
            return False
        try:
            attempts, states = await self._db_call(events.claim, room, self.per_endpoint, self._busy_origins())
        except DatabaseError:
            logger.warning("could not claim due callbacks; trying again", exc_info=True)
            await asyncio.sleep(DB_RETRY_SECONDS)
            return False
        now = timezone.now()
        for attempt in attempts:
            key = attempt.endpoint
            self.origins.setdefault(key, set()).add(events.origin(attempt.url))
            decision = endpoints.decide(states.get(key), now)
            if decision == endpoints.SKIP:
                result = callbacks.DeliveryResult(None, 0, endpoints.skipped_error(states[key]))
                self.outcomes.append(events.Outcome(attempt, now, result, sent=False))
            elif self.in_flight[key] >= self.per_endpoint or (decision == endpoints.PROBE and key in self.probing):
                self.outcomes.append(events.Outcome(attempt, now))  # deferred: no room, or a probe decides first
            else:
                if decision == endpoints.PROBE:
                    self.probing.add(key)
                self.in_flight[key] += 1
                task = asyncio.create_task(self._send(session, attempt))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        return len(attempts) >= room

    async def _send(self, session, attempt):
        started = timezone.now()
        try:
            result = await callbacks.deliver_async(session, attempt.url, attempt.key, attempt.event_id, attempt.body)
        except Exception as error:  # never lose an outcome to a bug in the transport
            logger.exception("callback %s: unexpected error", attempt.event_id)
            result = callbacks.DeliveryResult(None, 0, f"{type(error).__name__}: {error}"[:1000])
        finally:
            self.in_flight[attempt.endpoint] -= 1
            if not self.in_flight[attempt.endpoint]:
                del self.in_flight[attempt.endpoint]
        self.sent += 1
        self.outcomes.append(events.Outcome(attempt, started, result))
        self._wakeup.set()  # room for another

    async def _write_forever(self):
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self._write()

    async def _write(self):
        while self.outcomes:
            batch, self.outcomes = self.outcomes[:FLUSH_SIZE], self.outcomes[FLUSH_SIZE:]
            try:
                await self._db_call(events.record, batch)
            except DatabaseError:
                logger.warning("could not record %d callback attempts; trying again", len(batch), exc_info=True)
                self.outcomes[:0] = batch
                await asyncio.sleep(DB_RETRY_SECONDS)
                if self._stopping.is_set():
                    return
                continue
            probed = {o.attempt.endpoint for o in batch if o.result is not None and o.sent}
            if self.probing & probed:
                self.probing -= probed
                self._wakeup.set()


_running = None


def start():
    """Start this process's delivery loop (the callbacks worker calls this once it is ready)."""
    global _running
    if _running is None:
        _running = DeliveryLoop().start()
    return _running


def wake():
    """Wake this process's loop, if it runs one."""
    if _running is not None:
        _running.wake()


def stop_claiming():
    """Claim nothing more; attempts in flight go on (thread-safe, does not block)."""
    if _running is not None:
        _running._stopping.set()
        _running.wake()


def stop():
    global _running
    if _running is not None:
        _running.stop()
        _running = None
