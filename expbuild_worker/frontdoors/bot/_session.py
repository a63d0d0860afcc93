"""The bot's session with a Remote Workers API scheduler: join, long-poll, report, rejoin, leave."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf import any_pb2

from expbuild_worker.api.rwapi import bots_pb2 as b_pb
from expbuild_worker.engine import ExecutionEngine
from expbuild_worker.errors import NotFoundError
from expbuild_worker.frontdoors.bot._cas_client import rpc_error_text
from expbuild_worker.frontdoors.bot._leases import HeldLease, LeaseOutcome, LeaseWork, handed_back
from expbuild_worker.frontdoors.bot._platform import worker_message

if TYPE_CHECKING:
    from expbuild_worker.api.rwapi.bots_pb2_grpc import BotsAsyncStub

_log = logging.getLogger(__name__)

SESSION_LOST = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
    }
)
"""Statuses of UpdateBotSession after which the session is gone (BuildGrid: unknown bot, closed or
replaced session): the bot opens a new one. Any other failure is retried on the same session
until it expires, so a scheduler that restarts with its database keeps the bot's leases."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BotSettings:
    """How the bot presents itself and how patiently it talks to the scheduler."""

    bot_id: str
    instance_name: str
    capacity: int
    properties: tuple[tuple[str, str], ...]
    poll_timeout_seconds: float = 30.0
    """Deadline of each UpdateBotSession; BuildGrid holds a call open for most of it when idle."""
    reconnect_min_seconds: float = 0.5
    reconnect_max_seconds: float = 30.0
    orphan_keep_seconds: float = 600.0
    """How long the result of a lease whose session was lost is kept, in case the scheduler
    leases the same action (same lease id) to this bot again: then it is reported, not rerun."""
    call_metadata: tuple[tuple[str, str], ...] = ()
    """Sent with every call to the scheduler (a bearer token)."""


@dataclass
class BotStats:
    """Counters since start, for logs, tests and benchmarks."""

    sessions: int = 0
    leases_received: int = 0
    results_reported: int = 0
    handed_back: int = 0
    withdrawn_by_scheduler: int = 0
    overhead_seconds_total: float = 0.0


class _Backoff:
    """Exponential waits with jitter between ``low`` and ``high`` seconds; ``reset`` after a success."""

    def __init__(self, low: float, high: float) -> None:
        self._low, self._high = low, max(low, high)
        self._next = low

    def next(self) -> float:
        wait = self._next * random.uniform(0.8, 1.2)
        self._next = min(self._high, self._next * 2)
        return min(wait, self._high)

    def reset(self) -> None:
        self._next = self._low


class Bot:
    """A Remote Workers API bot over the shared engine.

    One task talks to the scheduler, one call at a time: CreateBotSession, then UpdateBotSession
    in a loop, each call carrying every lease held (ACTIVE while running, COMPLETED with its
    result until acknowledged). When a lease finishes, the long poll in flight is cancelled so
    the result goes out at once. A lease the scheduler drops from its answer was cancelled:
    its action is stopped (unless another lease shares the execution). A result is forgotten
    only once a call carrying it succeeded, so none is lost to a failed call, and none is sent
    in two successful calls.

    The scheduler unreachable or failing: the same session is retried with backoff until it
    expires. The session gone (the scheduler forgot it): a new session is opened; leases of
    the old one become orphans, kept (running or finished) in case the scheduler leases them
    here again, when they are adopted instead of run twice.
    """

    name = "bot"

    def __init__(
        self,
        *,
        stub: BotsAsyncStub,
        work: LeaseWork,
        engine: ExecutionEngine,
        settings: BotSettings,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._stub = stub
        self._work = work
        self._engine = engine
        self.settings = settings
        self._on_close = on_close
        self._status = b_pb.BotStatus.OK
        self._session: str | None = None
        self._version = ""
        self._expires_at = 0.0
        self._leases: dict[str, HeldLease] = {}
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._worker = worker_message(settings.bot_id, settings.properties, settings.capacity)
        self.stats = BotStats()
        self.joined = asyncio.Event()
        """Set while the bot holds a session (cleared when it is lost)."""

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start talking to the scheduler (on the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="expbuild-bot")

    async def drain(self, grace_seconds: float) -> None:
        """Leave: take no new leases, give running ones ``grace_seconds`` to finish, hand the rest back.

        The session turns BOT_TERMINATING at once (the scheduler assigns it nothing more); what is
        unfinished after the grace is stopped and reported UNAVAILABLE, which BuildGrid gives to
        another bot; the loop ends once every outcome was delivered (or could not be for a while).
        """
        self._status = b_pb.BotStatus.BOT_TERMINATING
        self._changed.set()
        deadline = time.monotonic() + grace_seconds
        while self._unfinished() and time.monotonic() < deadline:
            await self._wait_changed(min(0.5, max(0.0, deadline - time.monotonic())))
        for held in self._unfinished():
            self._hand_back(held, "the bot is stopping")
        deadline = time.monotonic() + max(5.0, self.settings.poll_timeout_seconds)
        while self._session is not None and self._current() and time.monotonic() < deadline:
            await self._wait_changed(0.2)
        for held in self._current():
            _log.warning(
                "lease %s: action %s: its outcome could not be delivered before the bot stopped; "
                "the scheduler gives it to another bot when the session expires",
                held.lease_id,
                held.action or "?",
            )

    async def close(self) -> None:
        """Stop the session task and release the channel (call ``drain`` first to leave cleanly)."""
        self._stopping.set()
        self._changed.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for held in list(self._leases.values()):
            if held.task is not None and not held.task.done():
                self._stop_execution(held)
                held.task.cancel()
        if self._on_close is not None:
            await self._on_close()

    # ---- the session loop --------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = _Backoff(self.settings.reconnect_min_seconds, self.settings.reconnect_max_seconds)
        while not self._stopping.is_set():
            self._forget_old_orphans()
            if self._session is None:
                if self._status != b_pb.BotStatus.OK:
                    return  # leaving: never open a session only to say so
                if not await self._create(backoff):
                    await self._sleep(backoff.next())
                continue
            await self._update(backoff)

    async def _create(self, backoff: _Backoff) -> bool:
        session = b_pb.BotSession(bot_id=self.settings.bot_id, status=self._status, worker=self._worker)
        request = b_pb.CreateBotSessionRequest(parent=self.settings.instance_name, bot_session=session)
        try:
            answer = await self._stub.CreateBotSession(
                request, timeout=self.settings.poll_timeout_seconds, metadata=self.settings.call_metadata
            )
        except grpc.aio.AioRpcError as err:
            _log.warning("bot %s: cannot open a session: %s", self.settings.bot_id, rpc_error_text(err))
            return False
        self._session = answer.name
        self.stats.sessions += 1
        self.joined.set()
        backoff.reset()
        _log.info(
            "bot %s: session %s opened (capacity %d, %d properties offered)",
            self.settings.bot_id,
            answer.name,
            self.settings.capacity,
            len(self.settings.properties),
        )
        self._take(answer, sent_active=set(), reported=set())
        return True

    async def _update(self, backoff: _Backoff) -> None:
        assert self._session is not None
        self._changed.clear()
        request = self._update_request(self._session)
        sent = request.bot_session.leases
        reported = {lease.id for lease in sent if lease.state == b_pb.LeaseState.COMPLETED}
        sent_active = {lease.id for lease in sent if lease.state == b_pb.LeaseState.ACTIVE}
        call = self._stub.UpdateBotSession(
            request, timeout=self.settings.poll_timeout_seconds, metadata=self.settings.call_metadata
        )
        answering = asyncio.ensure_future(call)
        changed = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({answering, changed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
        if not answering.done():
            # Something to say (a result, leaving): end the long poll and say it. A lease the
            # scheduler assigned meanwhile is sent again by it on the next call.
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await answering
            return
        try:
            answer = answering.result()
        except grpc.aio.AioRpcError as err:
            await self._failed(err, backoff)
            return
        backoff.reset()
        self._take(answer, sent_active=sent_active, reported=reported)

    async def _failed(self, err: grpc.aio.AioRpcError, backoff: _Backoff) -> None:
        code = err.code()
        if code in SESSION_LOST or (self._expires_at and time.time() > self._expires_at):
            _log.warning(
                "bot %s: session %s is gone (%s); opening a new one",
                self.settings.bot_id,
                self._session,
                rpc_error_text(err),
            )
            self._lose_session()
            return
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return  # a long poll that ran out: ask again at once
        wait = backoff.next()
        _log.warning(
            "bot %s: UpdateBotSession failed (%s); retrying in %.1fs",
            self.settings.bot_id,
            rpc_error_text(err),
            wait,
        )
        await self._sleep(wait)

    def _lose_session(self) -> None:
        self._session = None
        self._version = ""
        self._expires_at = 0.0
        self.joined.clear()

    def _update_request(self, session: str) -> b_pb.UpdateBotSessionRequest:
        bot_session = b_pb.BotSession(
            name=session,
            bot_id=self.settings.bot_id,
            status=self._status,
            worker=self._worker,
            version=self._version,
        )
        for held in self._current():
            lease = bot_session.leases.add(id=held.lease_id)
            if held.outcome is None:
                lease.state = b_pb.LeaseState.ACTIVE
                continue
            lease.state = b_pb.LeaseState.COMPLETED
            lease.status.CopyFrom(held.outcome.status)
            if held.outcome.result is not None:
                packed = any_pb2.Any()
                packed.Pack(held.outcome.result)
                lease.result.CopyFrom(packed)
        return b_pb.UpdateBotSessionRequest(name=session, bot_session=bot_session)

    def _take(self, answer: b_pb.BotSession, *, sent_active: set[str], reported: set[str]) -> None:
        """Act on the scheduler's view: results acknowledged, leases withdrawn, leases new."""
        self._version = answer.version
        if answer.HasField("expire_time"):
            self._expires_at = answer.expire_time.ToNanoseconds() / 1e9
        now = time.time()
        for lease_id in reported:
            held = self._leases.pop(lease_id, None)
            if held is not None:
                self._acknowledged(held, now)
        offered = {lease.id: lease for lease in answer.leases}
        for lease_id in sent_active - offered.keys():
            held = self._leases.get(lease_id)
            if held is not None and held.session == self._session:
                self._withdrawn_by_scheduler(held, "the scheduler dropped the lease")
        for lease in answer.leases:
            if lease.state == b_pb.LeaseState.CANCELLED:
                held = self._leases.get(lease.id)
                if held is not None:
                    self._withdrawn_by_scheduler(held, "the scheduler cancelled the lease")
            elif lease.state in (b_pb.LeaseState.ACTIVE, b_pb.LeaseState.PENDING):
                self._accept(lease)

    def _accept(self, lease: b_pb.Lease) -> None:
        assert self._session is not None
        held = self._leases.get(lease.id)
        if held is not None:
            if held.session != self._session:
                held.session = self._session  # leased here again after the session was lost
                _log.info(
                    "lease %s: action %s adopted from a lost session", held.lease_id, held.action or "?"
                )
                if held.outcome is not None:
                    self._changed.set()
            return
        held = HeldLease(lease_id=lease.id, payload=lease.payload, session=self._session)
        self._leases[lease.id] = held
        self.stats.leases_received += 1
        if self._status != b_pb.BotStatus.OK:
            self._hand_back(held, "the bot is stopping")
            return
        _log.info("lease %s: received", lease.id)
        held.task = asyncio.get_running_loop().create_task(self._run_lease(held), name=f"lease-{lease.id}")

    async def _run_lease(self, held: HeldLease) -> None:
        try:
            outcome = await self._work.run(held, lambda _: None)
        except asyncio.CancelledError:
            return
        if held.outcome is None and self._leases.get(held.lease_id) is held:
            held.outcome = outcome
            self._changed.set()

    def _acknowledged(self, held: HeldLease, now: float) -> None:
        self.stats.results_reported += 1
        outcome = held.outcome or LeaseOutcome(status=handed_back("unknown").status)
        overhead = held.times.overhead_seconds(now)
        if outcome.result is not None:
            self.stats.overhead_seconds_total += overhead
        if held.withdrawn is not None:
            self.stats.handed_back += 1
        _log.info(
            "lease %s: action %s reported: status %d%s, exit code %s; %.3fs from lease to report, "
            "command %.3fs, bot overhead %.3fs",
            held.lease_id,
            held.action or "?",
            outcome.status.code,
            f" ({outcome.status.message})" if outcome.status.message else "",
            outcome.result.exit_code if outcome.result is not None else "-",
            now - held.times.received,
            held.times.command_seconds,
            overhead,
        )

    # ---- taking leases back ------------------------------------------------------------------

    def _withdrawn_by_scheduler(self, held: HeldLease, why: str) -> None:
        """Forget the lease; stop its action unless another lease still wants the same execution."""
        self._leases.pop(held.lease_id, None)
        self.stats.withdrawn_by_scheduler += 1
        held.withdrawn = why
        _log.info("lease %s: action %s: %s; stopping it", held.lease_id, held.action or "?", why)
        self._stop_execution(held)

    def _hand_back(self, held: HeldLease, why: str) -> None:
        """Report the lease UNAVAILABLE now (the scheduler retries it elsewhere) and stop its action."""
        held.withdrawn = why
        if held.outcome is None:
            held.outcome = handed_back(why)
        self._stop_execution(held)
        self._changed.set()

    def _stop_execution(self, held: HeldLease) -> None:
        execution = held.execution
        if execution is None or execution.done.is_set():
            return
        shared = any(
            other is not held and other.execution is execution and other.withdrawn is None
            for other in self._leases.values()
        )
        if not shared:
            with contextlib.suppress(NotFoundError):
                self._engine.cancel(execution.execution_id)

    # ---- helpers -----------------------------------------------------------------------------

    def _current(self) -> list[HeldLease]:
        return [held for held in self._leases.values() if held.session == self._session]

    def _unfinished(self) -> list[HeldLease]:
        return [held for held in self._current() if held.outcome is None]

    def _forget_old_orphans(self) -> None:
        now = time.time()
        for held in list(self._leases.values()):
            if held.session == self._session or held.outcome is None:
                continue
            if now - (held.times.result or held.times.received) > self.settings.orphan_keep_seconds:
                del self._leases[held.lease_id]
                _log.warning(
                    "lease %s: action %s: its session was lost and the scheduler did not lease it here "
                    "again; the result is dropped (the scheduler re-ran the action elsewhere)",
                    held.lease_id,
                    held.action or "?",
                )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _wait_changed(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
