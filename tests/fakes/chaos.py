"""A chaos TCP proxy: real sockets between the service and the fake upstream.

Each accepted connection becomes a *link* (client socket + upstream socket, one pump task
per direction). The test flips what links do, the way a network misbehaves:

- forwarding: bytes pass (after ``delay`` seconds per chunk);
- held (``blackhole_all``): an outage; nothing moves, nothing is lost, and ``pass_all()``
  delivers what waited (as TCP retransmission would after a short outage);
- dead (``blackhole_existing``): the path is gone for good (a network flip); bytes are read
  and dropped, sockets stay open, and only the client closing its socket ends the link.
  ``except_active_within=s`` spares links that forwarded a byte in the last ``s`` seconds
  (a stream in flight), so only idle pooled connections go stale.

``reset_existing`` closes the client side with RST; ``refuse`` closes the listening socket so
connecting gets a real ECONNREFUSED, and any later mode change reopens it on the same port.
"""

from __future__ import annotations

import enum
import logging
import socket
import struct
from dataclasses import dataclass, field
from itertools import count

import trio

log = logging.getLogger("tests.fakes.chaos")

_CHUNK = 65536


class LinkState(enum.Enum):
    FORWARDING = "forwarding"
    HELD = "held"
    DEAD = "dead"


@dataclass(eq=False, kw_only=True)
class _Link:
    number: int
    client: trio.SocketStream
    state: LinkState
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    upstream: trio.SocketStream | None = None
    reset: bool = False  # close the client side with RST when the link ends
    last_active: float = field(default_factory=trio.current_time)  # last forwarded byte
    changed: trio.Event = field(default_factory=trio.Event)

    def set_state(self, state: LinkState) -> None:
        if self.state is LinkState.DEAD:
            return  # a dead path never comes back
        self.state = state
        self.changed.set()
        self.changed = trio.Event()


def _close_with_rst(stream: trio.SocketStream) -> None:
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass  # already closed or never connected: nothing to reset
    stream.socket.close()


class ChaosProxy:
    """A TCP forwarder on 127.0.0.1 whose links the test can hold, kill, reset or refuse."""

    def __init__(self, *, target_host: str = "127.0.0.1", target_port: int, delay: float = 0.0):
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay  # seconds added before each forwarded chunk
        self.accepted = 0  # connections accepted in total
        self.active = 0  # links currently open
        self.bytes_up = 0  # client -> upstream, forwarded
        self.bytes_down = 0  # upstream -> client, forwarded
        self._new_state = LinkState.FORWARDING
        self._links: set[_Link] = set()
        self._numbers = count(1)
        self._listener: trio.SocketListener | None = None
        self._nursery: trio.Nursery | None = None
        self._port: int | None = None
        self._links_changed = trio.Event()  # set and replaced whenever a link opens or ends

    async def wait_active(self, count: int = 0) -> None:
        """Wait until exactly ``count`` links are open (default: all closed).

        No deadline of its own: call it under ``trio.fail_after``. Cancel-safe.
        """
        while self.active != count:
            await self._links_changed.wait()

    def _notify_links_changed(self) -> None:
        self._links_changed.set()
        self._links_changed = trio.Event()

    # --- serving ------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("ChaosProxy is not serving")
        return self._port

    @property
    def refusing(self) -> bool:
        return self._listener is None and self._nursery is not None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on 127.0.0.1 port 0 and forward until cancelled; reports the port.

        Cancel-safe: on cancellation every socket (listener and links) is closed.
        """
        if self._nursery is not None:
            raise RuntimeError("ChaosProxy is already serving")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._open_listener(0)
                task_status.started(self.port)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            if self._listener is not None:
                self._listener.socket.close()
                self._listener = None

    def _open_listener(self, port: int) -> None:
        """Bind and listen synchronously, so a mode change takes effect before it returns."""
        assert self._nursery is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # Reopening the same port while old links still use it needs SO_REUSEADDR.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._listener = listener
        self._port = sock.getsockname()[1]
        self._nursery.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                try:
                    client = await listener.accept()
                except trio.ClosedResourceError:
                    return  # refuse() closed the listener
                assert self._nursery is not None
                self._nursery.start_soon(self._run_link, client)

    # --- modes --------------------------------------------------------------------

    def pass_all(self) -> None:
        """Forward normally: held links resume, new links forward; dead links stay dead."""
        self._set_new_state(LinkState.FORWARDING)
        for link in list(self._links):
            link.set_state(LinkState.FORWARDING)

    def blackhole_existing(self, *, except_active_within: float | None = None) -> int:
        """A network flip: open links go dead for good; new connections forward.

        With ``except_active_within``, links that forwarded a byte within that many
        seconds are spared. Returns how many links went dead.
        """
        self._set_new_state(LinkState.FORWARDING)
        now = trio.current_time()
        killed = 0
        for link in list(self._links):
            if except_active_within is not None and now - link.last_active <= except_active_within:
                continue
            link.set_state(LinkState.DEAD)
            killed += 1
        return killed

    def blackhole_all(self) -> None:
        """An outage: open and new links are held (accepted, nothing forwarded)."""
        self._set_new_state(LinkState.HELD)
        for link in list(self._links):
            link.set_state(LinkState.HELD)

    def reset_existing(self) -> None:
        """Close every open link, with RST on the client side."""
        for link in list(self._links):
            link.reset = True
            link.scope.cancel()

    def close_existing(self) -> None:
        """Close every open link cleanly (FIN on both sides)."""
        for link in list(self._links):
            link.scope.cancel()

    def refuse(self) -> None:
        """Close the listening socket: new connections get ECONNREFUSED. Open links go on."""
        if self._listener is not None:
            self._listener.socket.close()  # wakes the accept loop with ClosedResourceError
            self._listener = None

    def _set_new_state(self, state: LinkState) -> None:
        self._new_state = state
        if self.refusing:
            self._open_listener(self.port)

    # --- links --------------------------------------------------------------------

    async def _run_link(self, client: trio.SocketStream) -> None:
        link = _Link(number=next(self._numbers), client=client, state=self._new_state)
        self.accepted += 1
        self.active += 1
        self._links.add(link)
        self._notify_links_changed()
        try:
            with link.scope:
                try:
                    link.upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
                except OSError as error:
                    log.debug("link %d: upstream connect failed: %r", link.number, error)
                    link.reset = True
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, link, client, link.upstream, True)
                    nursery.start_soon(self._pump, link, link.upstream, client, False)
        finally:
            self._links.discard(link)
            self.active -= 1
            self._notify_links_changed()
            # Synchronous closes: nothing awaits in this finally.
            if link.reset:
                _close_with_rst(client)
            else:
                client.socket.close()
            if link.upstream is not None:
                link.upstream.socket.close()

    async def _pump(
        self, link: _Link, source: trio.SocketStream, sink: trio.SocketStream, upward: bool
    ) -> None:
        """Move bytes one way for as long as the link's state allows."""
        while True:
            try:
                data = await source.receive_some(_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                link.reset = not upward  # an upstream reset reaches the client as a reset
                link.scope.cancel()
                return
            while link.state is LinkState.HELD:
                await link.changed.wait()
            if link.state is LinkState.DEAD:
                if data:
                    continue  # the path is gone: bytes vanish
                if upward:
                    link.scope.cancel()  # the client hung up: nothing left to keep open
                return  # upstream gave up; the client keeps a silent socket
            if self.delay > 0:
                await trio.sleep(self.delay)
            try:
                if not data:
                    await sink.send_eof()
                    return
                await sink.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                link.scope.cancel()
                return
            link.last_active = trio.current_time()
            if upward:
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)


__all__ = ["ChaosProxy", "LinkState"]
