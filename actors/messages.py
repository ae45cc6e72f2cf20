"""Every message an actor accepts, every reply, and the request/reply plumbing.

A request carries ``reply``: the send end of a per-request channel of size 1. The
actor answers with ``send_nowait`` (a value, or a CodexLBError instance to raise in
the caller) and closes it. If the actor dies while holding the request, the ``with
msg.reply:`` around its handling closes the channel unanswered and the caller gets
ActorUnavailable at once instead of waiting for its deadline.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from actors.errors import ActorUnavailable, CodexLBError

if TYPE_CHECKING:
    import httpx

    from actors.accounts import Account, TokenSet, Usage

T = TypeVar("T")

DEFAULT_CALL_TIMEOUT = 30.0


class RotationReason(enum.StrEnum):
    NETWORK_CHANGE = "network-change"
    WAKE = "wake"
    ADMIN = "admin"
    TRANSPORT = "transport"
    HEDGE = "hedge"


# A route change or a wake proves the old path dead without any request failing.
DEAD_PATH_REASONS = frozenset({RotationReason.NETWORK_CHANGE, RotationReason.WAKE})


class EvidenceKind(enum.StrEnum):
    """What was seen about a network path, strongest first (DESIGN.md §2, path health)."""

    KERNEL = "kernel"  # a socket's own keepalive / TCP_USER_TIMEOUT error
    ADDRESS = "address"  # the route's source address changed: sockets on the old one are dead
    APPLICATION = "application"  # a header timeout or reset, corroborated by a fresh connection
    HEDGE = "hedge"  # a hedge on a fresh connection answered where the original did not
    WAKE = "wake"  # the machine slept: every older generation is dead


@dataclass(frozen=True, slots=True, kw_only=True)
class Evidence:
    """One observation about a path: what, on which host and generation, where, when."""

    kind: EvidenceKind
    host: str
    generation: int | None
    local_address: str | None = None
    when: float
    detail: str = ""


# --- ClientManager --------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Acquire:
    reply: trio.MemorySendChannel[Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class Release:
    generation: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadersSeen:
    """A lease's request got its response headers (sent on the release channel)."""

    generation: int
    sent_at: float
    latency: float
    sample: bool  # a streamed call's latency: counts towards hedge_after


@dataclass(frozen=True, slots=True, kw_only=True)
class HedgeDone:
    """How one hedge ended: which attempt answered first ("original", "hedge" or "none")."""

    original: int
    hedge: int
    winner: str
    sent_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Rotate:
    seen_generation: int | None
    reason: RotationReason
    path_dead: bool
    reply: trio.MemorySendChannel[Any]
    # False for a failure while connecting: a socket that never existed says nothing about
    # the path of the generation's open ones, so it makes the generation no suspect.
    evidence: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class AddressChanged:
    """The watcher saw the route's source address change from ``old`` to ``new``."""

    old: str | None
    new: str
    reply: trio.MemorySendChannel[Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class GetClientStats:
    reply: trio.MemorySendChannel[Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownClients:
    reply: trio.MemorySendChannel[Any]


ClientManagerMessage = Acquire | Rotate | AddressChanged | GetClientStats | ShutdownClients
# What a lease sends back without waiting: unbounded, one item per lease or answered call.
LeaseNote = Release | HeadersSeen | HedgeDone | Evidence


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientStats:
    generation: int
    leases: dict[int, int]
    retired: tuple[int, ...]
    rotations: dict[str, int]
    force_closes: int
    rotation_failures: int
    host: str = ""
    dead: tuple[int, ...] = ()
    hedge_after: float = 0.0
    hedges: dict[str, int] = field(default_factory=dict)
    evidence: dict[str, int] = field(default_factory=dict)
    sockets_closed: dict[str, int] = field(default_factory=dict)
    sockets: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "generation": self.generation,
            "leases": {str(k): v for k, v in self.leases.items()},
            "retired": list(self.retired),
            "dead": list(self.dead),
            "rotations": dict(self.rotations),
            "force_closes": self.force_closes,
            "rotation_failures": self.rotation_failures,
            "hedge_after": round(self.hedge_after, 3),
            "hedges": dict(self.hedges),
            "evidence": dict(self.evidence),
            "sockets": self.sockets,
            "sockets_closed": dict(self.sockets_closed),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseGrant:
    """What the manager hands out for one acquire; the handle wraps it in a Lease."""

    generation: int
    client: httpx.AsyncClient
    path_dead: trio.Event
    hedge_after: float = 2.0  # a streamed call's headers later than this start one hedge
    sockets: Any = None  # the generation's SocketRegistry (actors/path_health.py)


# --- TokenRefresher -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EnsureFresh:
    account_id: str
    force: bool
    reply: trio.MemorySendChannel[Any]
    # False: a transport failure is answered as is, without rotating the client; the
    # caller (the RefreshScheduler) owns the rotation budget of its failover cycle.
    rotate_on_transport: bool = True
    # With force: the fingerprint (accounts.token_fingerprint) of the access token the
    # upstream refused. If the account's token has changed since, no refresh is made.
    rejected_token_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshDone:
    """A refresh task's outcome, sent back to the refresher's own inbox."""

    account_id: str
    result: Any  # TokenSet or CodexLBError


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownRefresher:
    reply: trio.MemorySendChannel[Any]


TokenRefresherMessage = EnsureFresh | RefreshDone | ShutdownRefresher


@dataclass(frozen=True, slots=True, kw_only=True)
class FreshTokens:
    account: Account
    tokens: TokenSet
    # The refresh that produced these rotated the client (a caller with its own rotation
    # budget counts it as spent).
    rotated: bool = False


# --- RefreshScheduler -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RefreshNow:
    """Run a model refresh, then a usage sweep, both started after this request."""

    reply: trio.MemorySendChannel[Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class GetCatalog:
    # True: with no catalog yet, fetch one (or join the fetch under way) and answer it.
    fetch_if_missing: bool
    reply: trio.MemorySendChannel[Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownScheduler:
    reply: trio.MemorySendChannel[Any]


RefreshSchedulerMessage = RefreshNow | GetCatalog | ShutdownScheduler


@dataclass(frozen=True, slots=True, kw_only=True)
class Catalog:
    """The model catalog: raw model JSON per plan, and when it was fetched."""

    models: tuple[dict[str, Any], ...]
    fetched_at: float
    by_plan: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageUpdate:
    account_id: str
    usage: Usage


# --- request / reply ----------------------------------------------------------------


async def call(
    inbox: trio.MemorySendChannel[Any],
    make: Callable[[trio.MemorySendChannel[Any]], Any],
    *,
    actor: str,
    timeout: float = DEFAULT_CALL_TIMEOUT,
    on_abandoned: Callable[[Any], None] | None = None,
) -> Any:
    """Send ``make(reply)`` to an actor and wait for its answer.

    Raises ActorUnavailable if the actor is shut down, dies holding the request, or
    does not answer within ``timeout``; raises the CodexLBError the actor replied with.
    Cancel-safe: a cancelled caller leaves the actor to answer into a closed channel,
    which it ignores. ``on_abandoned`` receives an answer that arrived but was never
    delivered because the caller was cancelled (e.g. to give back a lease).
    """
    reply_send, reply_recv = trio.open_memory_channel[Any](1)
    delivered = False
    with reply_recv:
        try:
            with reply_send:
                # The message owns the only open clone of the send end.
                message = make(reply_send.clone())
            with trio.fail_after(timeout):
                await inbox.send(message)
                result = await reply_recv.receive()
                delivered = True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ActorUnavailable(f"the {actor} is shut down") from None
        except trio.EndOfChannel:
            raise ActorUnavailable(f"the {actor} stopped before answering") from None
        except trio.TooSlowError:
            raise ActorUnavailable(f"the {actor} did not answer within {timeout:g}s") from None
        finally:
            if not delivered and on_abandoned is not None:
                try:
                    on_abandoned(reply_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    pass
    if isinstance(result, CodexLBError):
        raise result
    return result


def answer(reply: trio.MemorySendChannel[Any], value: Any) -> bool:
    """Reply to a request; a caller that gave up (closed its end) is not an error.

    Returns whether the answer was handed over.
    """
    try:
        reply.send_nowait(value)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
        return False
    return True


def close_inbox(inbox: trio.MemoryReceiveChannel[Any]) -> None:
    """Close an actor's inbox for good, telling every queued request's caller at once."""
    while True:
        try:
            message = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
        reply = getattr(message, "reply", None)
        if reply is not None:
            reply.close()
    inbox.close()
