"""keen_stream.client in the fault harness: a StreamClient and the application that iterates it.

:class:`StreamClientConsumer` is a :class:`~tests.faults.harness.Follower`: ``verify`` checks
what the client handed to its caller, so the caller's whole stream counts as one connection.
The check's "no repeat within a connection" and "in order within a connection" then mean what
the client promises: every event exactly once, in cursor order, across every reconnect. A
``StreamGap`` counts as ``recovered: false``; any other exception out of the iterator (a typed
signal: ``TokenExpired``, ``AccountInactive``, ...) ends the consumer and is recorded in
``signals``, and in ``unexpected`` (a failed verdict) unless the test said it expects it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

from keen_stream.client import StreamClient, StreamGap, Subscription, TokenProvider
from tests.faults.harness import (
    Cursor,
    Disconnect,
    Received,
    SubscribeReply,
    SubscriptionSpec,
    Timeline,
    parse_cursor,
)

#: The caller's stream is one "connection" for the check (see the module docstring).
CALLER = 1


class StreamClientConsumer:
    """An application following the stream with :class:`StreamClient`, given every hub URL.

    ``pause()`` makes the application stop asking for events (busy with its own work) until
    ``resume()``; the client then stops reading its socket, as a real one would, and the hub
    eventually closes it as too slow (4008). ``expect`` names the exception the test expects
    to end this consumer (``TokenExpired`` for a token that runs out); it then still checks
    that everything up to that point came exactly once, in order (:meth:`check_signal`).
    """

    def __init__(
        self,
        name: str,
        urls: Sequence[str],
        spec: SubscriptionSpec,
        *,
        user_id: uuid.UUID,
        is_admin: bool,
        since: str | None,
        timeline: Timeline,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        ping_interval: float | None = 0.5,
        ping_timeout: float = 0.75,
        expect: type[BaseException] | None = None,
    ) -> None:
        self.name = name
        self.urls = list(urls)
        self.spec = spec
        self.user_id = str(user_id)
        self.is_admin = is_admin
        self.baseline = since
        self.last = since
        self.timeline = timeline
        self.expect = expect
        self.client = StreamClient(
            self.urls,
            token=token,
            token_provider=token_provider,
            client_type="fault-test-python",
            backoff_initial=0.05,
            backoff_max=0.25,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        self.sub: Subscription | None = None
        self.received: list[Received] = []
        self.replies: list[SubscribeReply] = []  # the client keeps its replies to itself
        self.error_frames: list[tuple[int, str, str]] = []
        self.connect_failures: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.signals: list[BaseException] = []
        self.gaps: list[StreamGap] = []
        self.unavailable = 0
        self._going = asyncio.Event()
        self._going.set()
        self._task: asyncio.Task[None] | None = None

    # --- control ----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.name}")

    def pause(self) -> None:
        self._going.clear()

    def resume(self) -> None:
        self._going.set()

    async def stop(self) -> None:
        self._going.set()
        if self.sub is not None:
            await self.sub.aclose()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 10)
            self._task = None
        await self.client.aclose()

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    # --- state (Follower) -----------------------------------------------------------------
    @property
    def recovered_false(self) -> int:
        return len(self.gaps)

    @property
    def reconnects(self) -> int:
        return 0 if self.sub is None else self.sub.reconnects

    @property
    def last_cursor(self) -> Cursor | None:
        return None if self.last is None else parse_cursor(self.last)

    @property
    def url(self) -> str | None:
        return None if self.sub is None else self.sub.url

    @property
    def live(self) -> bool:
        return self.sub is not None and self.sub.live

    @property
    def closes(self) -> Counter[int]:
        return Counter() if self.sub is None else self.sub.closes

    @property
    def disconnects(self) -> list[Disconnect]:
        """How the client's connections ended (code None: cut after an unanswered ping)."""
        if self.sub is None:
            return []
        ended = [
            Disconnect(0, "", code, "", "") for code, n in self.sub.closes.items() for _ in range(n)
        ]
        return ended + [Disconnect(0, "", None, "dead", "")] * self.sub.dead_connections

    def check_signal(self) -> list[str]:
        """What is wrong with how this consumer ended (nothing: as expected)."""
        if self.expect is None:
            return [f"{self.name} ended: {self.signals!r}"] if self.done else []
        if not self.signals or not isinstance(self.signals[0], self.expect):
            return [f"{self.name}: expected {self.expect.__name__}, got {self.signals!r}"]
        return []

    def evidence(self) -> dict[str, Any]:
        sub = self.sub
        return {
            "name": self.name,
            "kind": "keen_stream.client",
            "user_id": self.user_id,
            "is_admin": self.is_admin,
            "spec": self.spec.evidence(),
            "baseline": self.baseline,
            "last": self.last,
            "reconnects": self.reconnects,
            "closes": dict(self.closes),
            "dead_connections": 0 if sub is None else sub.dead_connections,
            "signals": [repr(e) for e in self.signals],
            "gaps": [repr(g) for g in self.gaps],
            "received": [f"{r.cursor[0]}-{r.cursor[1]}" for r in self.received],
        }

    # --- the application ----------------------------------------------------------------------
    async def _run(self) -> None:
        spec = self.spec
        self.sub = self.client.subscribe(
            scope=spec.scope,  # type: ignore[arg-type]
            sessions=list(spec.sessions) or None,
            events=list(spec.events) or None,
            since=self.baseline,
            on_gap=self.gaps.append,
        )
        try:
            async for event in self.sub:
                self.received.append(
                    Received(
                        event.position,
                        event.event_type,
                        str(event.user_id),
                        None if event.session_id is None else str(event.session_id),
                        CALLER,
                        0,
                        self.timeline.phase,
                    )
                )
                self.last = event.cursor
                await self._going.wait()
        except Exception as exc:  # a typed signal: the stream ended
            self.signals.append(exc)
            if self.expect is None or not isinstance(exc, self.expect):
                self.unexpected.append(f"raised {type(exc).__name__}: {exc}")
