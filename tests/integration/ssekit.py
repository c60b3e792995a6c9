"""Server-sent event clients for tests: httpx streaming against a real hub (hubkit.running_hub)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.integration.hubkit import Hub


@dataclass
class SseMessage:
    """One dispatched server-sent event (the fields as the HTML standard parses them)."""

    event: str
    data: str
    id: str | None

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


@dataclass
class SseStream:
    response: httpx.Response
    lines: AsyncIterator[str]
    #: The last ``id`` seen, as EventSource keeps it (its Last-Event-ID).
    last_id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    async def next(self, within: float = 10.0) -> SseMessage:
        return await asyncio.wait_for(self._next(), within)

    async def _next(self) -> SseMessage:
        event, event_id = "message", None
        data: list[str] = []
        async for line in self.lines:
            if not line:
                if data:
                    return SseMessage(event, "\n".join(data), event_id)
                event, event_id = "message", None
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value
                self.last_id = value
            elif name == "retry":
                self.retry = int(value)
        raise EOFError("the stream ended")

    async def expect(self, kind: str, within: float = 10.0) -> dict[str, Any]:
        message = await self.next(within)
        assert message.event == kind, message
        return message.json()

    async def events(self, count: int, within: float = 10.0) -> list[SseMessage]:
        """The next ``count`` events (plain messages); anything else fails."""
        got: list[SseMessage] = []
        while len(got) < count:
            message = await self.next(within)
            assert message.event == "message", message
            got.append(message)
        return got

    async def no_message(self, wait: float = 0.3) -> None:
        try:
            message = await self.next(wait)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected {message}")


@asynccontextmanager
async def http_client(hub: Hub) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=hub.http, timeout=30) as client:
        yield client


@asynccontextmanager
async def open_stream(
    client: httpx.AsyncClient,
    *,
    token: str | None = None,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    base: str = "",
) -> AsyncIterator[SseStream]:
    """``GET /events`` (``base``: the hub, if ``client`` has no base URL); the response must be
    the stream (200)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    async with client.stream("GET", f"{base}/events", params=params, headers=sent) as response:
        if response.status_code != 200:
            await response.aread()
            raise AssertionError(f"{response.status_code}: {response.text}")
        assert response.headers["content-type"].startswith("text/event-stream")
        yield SseStream(response, response.aiter_lines())


async def refused(
    client: httpx.AsyncClient,
    *,
    token: str | None = None,
    params: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """``GET /events`` that must be refused: (status, the error body)."""
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    response = await client.get("/events", params=params, headers=sent)
    assert response.status_code != 200, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["type"] == "error" and body["message"], body
    return response.status_code, body


async def ticket(client: httpx.AsyncClient, token: str) -> str:
    response = await client.post("/events/tickets", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 201, response.text
    value: str = response.json()["ticket"]
    return value
