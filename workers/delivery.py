"""The callbacks worker's delivery loop: one asyncio loop per callbacks process, with up to
CALLBACK_MAX_IN_FLIGHT attempts in flight, none of which holds a thread while it waits.

It claims due attempts from the database (events.claim), fairly across endpoints, whenever it is
woken (a `send_callback` message, a finished attempt) and every CALLBACK_DISPATCH_INTERVAL. Per
endpoint at most CALLBACK_ENDPOINT_MAX_IN_FLIGHT attempts are in flight, and twice as many may
wait here, claimed, to go out the moment one ends (so one busy receiver is not paced by the
claims); an endpoint that keeps failing meanwhile gets its waiting attempts put back without
counting. An open circuit breaker (endpoints.py) turns due attempts into recorded "not sent"
attempts without a network call. Outcomes are written in batches (events.record). Claims and
records each have a thread and a PostgreSQL connection: a process holds two connections whatever
its load, and a database outage only delays the writes (a claim never recorded is sent again when
its lease runs out).
"""

import asyncio
import logging
import resource
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import Error as DatabaseError  # InterfaceError too: a connection a restart closed
from django.db import close_old_connections, connections
from django.utils import timezone

from . import callbacks, endpoints, events

logger = logging.getLogger(__name__)

FLUSH_EVERY = 0.05  # seconds between writes of outcomes
FLUSH_SIZE = 500
MIN_POLL_GAP = 0.02  # wake-ups closer than this share one claim
# Claimed attempts per endpoint, in flight and waiting, in units of the per-endpoint cap. Waiting
# ones go out within two of its attempts' timeouts, well inside their lease.
CLAIM_AHEAD = 3
DB_RETRY_SECONDS = 1.0


class DeliveryLoop:
    """Runs in a thread of its own; start() and stop() are called from the worker's main thread."""

    def __init__(self, max_in_flight=None, per_endpoint=None, interval=None):
        self.max_in_flight = max_in_flight or settings.CALLBACK_MAX_IN_FLIGHT
        self.per_endpoint = per_endpoint or settings.CALLBACK_ENDPOINT_MAX_IN_FLIGHT
        self.interval = interval or settings.CALLBACK_DISPATCH_INTERVAL
        self.in_flight = Counter()  # endpoint -> attempts in flight
        self.waiting = {}  # endpoint -> deque of claimed attempts waiting for room
        self.failing = Counter()  # endpoint -> breaker failures in a row seen here
        self.failed_at = {}  # endpoint -> when the last of them ended (time.monotonic)
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
        # Claims and records each on a thread (and a PostgreSQL connection) of their own, so a
        # batch being written never holds up the next claim.
        self._claims = ThreadPoolExecutor(1, thread_name_prefix="callback-claims")
        self._records = ThreadPoolExecutor(1, thread_name_prefix="callback-records")

    # --- control, from other threads ---

    def start(self):
        self.max_in_flight = allow_sockets(self.max_in_flight)
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
        self._claims.shutdown(wait=False)
        self._records.shutdown(wait=False)

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
            for queue in self.waiting.values():  # claimed, never sent: back to the database, uncounted
                self.outcomes += [events.Outcome(attempt, timezone.now()) for attempt in queue]
            self.waiting.clear()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=settings.CALLBACK_TIMEOUT + 1)
            writer.cancel()
            await self._write()
        for executor in (self._claims, self._records):
            await self._loop.run_in_executor(executor, connections.close_all)

    async def _db_call(self, executor, function, *args):
        def call():
            close_old_connections()  # drops a connection a database restart broke
            try:
                return function(*args)
            finally:
                close_old_connections()

        return await self._loop.run_in_executor(executor, call)

    def _outstanding(self, key):
        return self.in_flight[key] + len(self.waiting.get(key, ()))

    def _rooms(self):
        """{origin: attempts it may still take} for the endpoints with attempts here or a probe
        pending; the claim gives the others up to the per-endpoint cap."""
        active = set(self.in_flight) | set(self.waiting) | self.probing
        # Forget endpoints with nothing here, so that a long-lived process does not collect them.
        self.origins = {key: origins for key, origins in self.origins.items() if key in active}
        cutoff = time.monotonic() - settings.CALLBACK_BREAKER_SECONDS
        for key in [key for key, at in self.failed_at.items() if at < cutoff and key not in active]:
            self.failed_at.pop(key)
            self.failing.pop(key, None)
        rooms = {}
        for key in active:
            room = 0 if key in self.probing else CLAIM_AHEAD * self.per_endpoint - self._outstanding(key)
            for origin in self.origins.get(key, ()):
                rooms[origin] = room
        return rooms

    async def _claim_and_send(self, session):
        """One claim; returns True when it filled all the room there was (more may be due)."""
        room = self.max_in_flight - len(self._tasks)
        if room <= 0:
            return False
        try:
            attempts, states = await self._db_call(self._claims, events.claim, room, CLAIM_AHEAD * self.per_endpoint,
                                                   self._rooms())
        except DatabaseError:
            logger.warning("could not claim due callbacks; trying again", exc_info=True)
            await asyncio.sleep(DB_RETRY_SECONDS)
            return False
        now = timezone.now()
        for attempt in attempts:
            key = attempt.endpoint
            self.origins.setdefault(key, set()).add(events.origin(attempt.url))
            decision = endpoints.decide(states.get(key), now)
            if attempt.error:
                self.outcomes.append(events.Outcome(attempt, now, callbacks.DeliveryResult(None, 0, attempt.error),
                                                    sent=False))
            elif decision == endpoints.SKIP:
                result = callbacks.DeliveryResult(None, 0, endpoints.skipped_error(states[key]))
                self.outcomes.append(events.Outcome(attempt, now, result, sent=False))
            elif decision == endpoints.PROBE:
                if key in self.probing or self.in_flight[key]:
                    self.outcomes.append(events.Outcome(attempt, now))  # deferred: one probe decides first
                else:
                    self.probing.add(key)
                    self._start(session, attempt)
            else:
                self.waiting.setdefault(key, deque()).append(attempt)
        for key in list(self.waiting):
            self._pump(session, key)
        return len(attempts) >= room

    def _pump(self, session, key):
        """Send what waits for `key` while it, and the loop, have room; put it back if the
        endpoint keeps failing."""
        queue = self.waiting.get(key)
        while queue and self.in_flight[key] < self.per_endpoint and len(self._tasks) < self.max_in_flight:
            attempt = queue.popleft()
            if self._keeps_failing(key):
                self.outcomes.append(events.Outcome(attempt, timezone.now()))  # its breaker decides next time
            else:
                self._start(session, attempt)
        if not queue:
            self.waiting.pop(key, None)
        if not self.in_flight[key]:
            del self.in_flight[key]

    def _keeps_failing(self, key):
        """Enough failures in a row here, lately, for the breaker to open once they are written:
        attempts waiting for the endpoint go back to the database instead (its breaker decides
        at their next claim). Forgotten after CALLBACK_BREAKER_SECONDS, so that an operator who
        closes the circuit is not second-guessed for long."""
        if self.failing[key] < settings.CALLBACK_BREAKER_FAILURES:
            return False
        return time.monotonic() - self.failed_at.get(key, 0) < settings.CALLBACK_BREAKER_SECONDS

    def _start(self, session, attempt):
        self.in_flight[attempt.endpoint] += 1
        task = asyncio.create_task(self._send(session, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, session, attempt):
        started = timezone.now()
        try:
            result = await callbacks.deliver_async(session, attempt.url, attempt.key, attempt.event_id, attempt.body)
        except Exception as error:  # never lose an outcome to a bug in the transport
            logger.exception("callback %s: unexpected error", attempt.event_id)
            result = callbacks.DeliveryResult(None, 0, f"{type(error).__name__}: {error}"[:1000])
        finally:
            self.in_flight[attempt.endpoint] -= 1
        self.sent += 1
        if endpoints.is_failure(result):
            self.failing[attempt.endpoint] += 1
            self.failed_at[attempt.endpoint] = time.monotonic()
        else:
            self.failing.pop(attempt.endpoint, None)
            self.failed_at.pop(attempt.endpoint, None)
        self.outcomes.append(events.Outcome(attempt, started, result))
        self._pump(session, attempt.endpoint)
        if len(self._tasks) <= self.max_in_flight and self.waiting:
            for key in list(self.waiting):  # a slot of the loop's own came free
                self._pump(session, key)
        self._wakeup.set()  # room for another

    async def _write_forever(self):
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            await self._write()

    async def _write(self):
        while self.outcomes:
            batch, self.outcomes = self.outcomes[:FLUSH_SIZE], self.outcomes[FLUSH_SIZE:]
            try:
                await self._db_call(self._records, events.record, batch)
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


def allow_sockets(wanted):
    """Raise the process's open-file limit to hold `wanted` connections besides its other files,
    as far as the hard limit allows; returns how many attempts may be in flight."""
    spare = 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted + spare:
        return wanted
    target = wanted + spare if hard == resource.RLIM_INFINITY else min(wanted + spare, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted + spare:
        logger.warning("open files limited to %d: at most %d callback attempts in flight", target, target - spare)
        return max(1, target - spare)
    return wanted


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
