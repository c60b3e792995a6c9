"""Stream tickets: a token (sent in a header) traded for a short-lived, single-use ticket that
opens one server-sent event stream, and the stream credential redeeming it mints for the
browser's own reconnects (docs/protocol.md, section 11; keen_stream/sql/tickets.sql).

Only SHA-256 hashes are stored. Every use re-checks the token the ticket was issued for, so a
revoked or expired token, or a suspended user, is refused however fresh the ticket.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final

import asyncpg
from pydantic import SecretStr

from keen_stream.dal.models.users import TokenInfo
from keen_stream.dal.tokens import check_status, hash_token, token_info
from keen_stream.errors import (
    StreamCredentialRejected,
    TicketExpired,
    TicketRejected,
    TicketUnknown,
    TicketUsed,
)

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

#: Recognisable in logs and by secret scanners, like the tokens' prefixes.
TICKET_PREFIX: Final = "ks_tkt_"
CREDENTIAL_PREFIX: Final = "ks_sse_"
_SECRET_BYTES: Final = 32
_MAX_SECRET_LENGTH: Final = 128

SQL: Final = {
    "issue": "SELECT * FROM keen_stream_ticket_issue($1, $2, $3)",
    "redeem": "SELECT * FROM keen_stream_ticket_redeem($1, $2, $3)",
    "authenticate": "SELECT * FROM keen_stream_credential_authenticate($1, $2)",
    # Past their expiry tickets and credentials are useless; an hour's grace keeps "used" and
    # "expired" told apart for a while. A spent ticket stays while a credential minted from it
    # lives: deleting it would cascade to the credential (12 h against the ticket's seconds),
    # and EventSource's reconnects name it in their URL.
    "prune": """
        DELETE FROM stream_tickets t
         WHERE t.expires_at < now() - interval '1 hour'
           AND NOT EXISTS (SELECT 1 FROM stream_tickets c
                            WHERE c.ticket_id = t.id
                              AND c.expires_at >= now() - interval '1 hour')""",
}

_TICKET_ERRORS: Final[dict[str, type[TicketRejected]]] = {
    "ticket_unknown": TicketUnknown,
    "ticket_used": TicketUsed,
    "ticket_expired": TicketExpired,
    "credential_unknown": StreamCredentialRejected,
    "credential_expired": StreamCredentialRejected,
}


@dataclass(frozen=True, slots=True)
class IssuedTicket:
    ticket: SecretStr
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class StreamGrant:
    """Who may open the stream. ``token_hash``: the hash of the underlying token (the hub
    re-checks connected clients by it). ``credential``: set when a ticket was just redeemed."""

    info: TokenInfo
    token_hash: str
    credential: SecretStr | None
    credential_expires_at: datetime


def _looks_like(secret: object, prefix: str) -> bool:
    return (
        isinstance(secret, str)
        and len(secret) <= _MAX_SECRET_LENGTH
        and secret.startswith(prefix)
        and secret.isascii()
    )


class TicketDAO:
    """``db.tickets``: issue, redeem, authenticate a stream credential, prune."""

    def __init__(self, db: KeenDatabase) -> None:
        self._db = db

    async def issue(self, token: str, ttl: timedelta) -> IssuedTicket:
        """A ticket for ``token`` (already validated by the caller, with its scopes)."""
        ticket = TICKET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        async with self._db.anonymous_transaction() as conn:
            row = await conn.fetchrow(SQL["issue"], hash_token(token), hash_token(ticket), ttl)
        check_status(row["status"])
        return IssuedTicket(SecretStr(ticket), row["expires_at"])

    async def redeem(self, ticket: str, credential_ttl: timedelta) -> StreamGrant:
        """Use ``ticket`` (once, whatever races it) and mint a stream credential."""
        if not _looks_like(ticket, TICKET_PREFIX):
            raise TicketUnknown()
        credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)
        async with self._db.anonymous_transaction() as conn:
            row = await conn.fetchrow(
                SQL["redeem"], hash_token(ticket), hash_token(credential), credential_ttl
            )
        return _grant(row, SecretStr(credential))

    async def authenticate(self, credential: str, ticket: str | None = None) -> StreamGrant:
        """The grant a stream credential carries; with ``ticket``, only the credential minted
        from that ticket."""
        if not _looks_like(credential, CREDENTIAL_PREFIX) or (
            ticket is not None and not _looks_like(ticket, TICKET_PREFIX)
        ):
            raise StreamCredentialRejected()
        async with self._db.anonymous_transaction() as conn:
            row = await conn.fetchrow(
                SQL["authenticate"],
                hash_token(credential),
                None if ticket is None else hash_token(ticket),
            )
        return _grant(row, None)

    async def prune(self) -> int:
        """Delete tickets and credentials an hour past their expiry."""
        async with self._db.system_transaction() as conn:
            status = await conn.execute(SQL["prune"])
        return int(status.split()[-1])


def _grant(row: asyncpg.Record, credential: SecretStr | None) -> StreamGrant:
    status = row["status"]
    if status in _TICKET_ERRORS:
        raise _TICKET_ERRORS[status]()
    info = token_info(row)
    return StreamGrant(info, row["token_hash"], credential, row["credential_expires_at"])
