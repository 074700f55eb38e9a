"""The edge's WebSocket link to the cloud verifier: framing, byte counting, an inbox of messages."""
from __future__ import annotations

import asyncio
import ssl
from typing import Callable

import aiohttp

import codec

# A graceful close waits for the peer's close frame; over a dead or stalled link that wait is
# pure delay before a reconnect, so it is short.
CLOSE_TIMEOUT_S = 1.0


class CloudError(RuntimeError):
    """The cloud refused or broke the session (its Error message, or a lost connection)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CloudLink:
    """One WebSocket session with the verifier. Reads happen in one reader task; sends anywhere."""

    def __init__(self, url: str, *, connect_timeout_s: float = 30.0, reply_timeout_s: float = 120.0,
                 ca_cert: str | None = None):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/ws") else "/ws")
        self.connect_timeout_s = connect_timeout_s
        self.reply_timeout_s = reply_timeout_s
        self.ssl = client_ssl(self.url, ca_cert)
        self.bytes_up = 0
        self.bytes_down = 0
        self.messages_up = 0
        self.messages_down = 0
        self.welcome: codec.Welcome | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self._stalled = False
        self._closed_by: CloudError | None = None  # the Error the verifier sent before closing
        # the newest epoch the verifier has named on this session (0: none yet); the next Prompt's
        # answer drafts in this + 1 (the cloud moves the epoch once at each Prompt)
        self.epoch = 0
        # observer(direction, message) for each message sent ("up") or received ("down"): traces,
        # and the load test's round-trip timing
        self.observer: Callable[[str, object], None] | None = None

    async def connect(self, hello: codec.Hello) -> codec.Welcome:
        """Open the WebSocket and exchange hello / welcome, all within connect_timeout_s.

        The whole handshake is bounded: a verifier behind a stalled link accepts TCP and then
        says nothing, and an unbounded HTTP upgrade would hang the reconnect loop for as long.
        """
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        try:
            return await asyncio.wait_for(self._handshake(hello), self.connect_timeout_s)
        except asyncio.TimeoutError as err:
            await self.close()
            raise CloudError("unreachable", f"no answer from the verifier at {self.url} within "
                                            f"{self.connect_timeout_s:g} s") from err
        except (aiohttp.ClientError, OSError, ssl.SSLError) as err:
            await self.close()
            raise CloudError("unreachable", f"cannot reach the verifier at {self.url}: {err}") from err
        except BaseException:  # a refusal (CloudError) or a cancelled reconnect: free the socket
            await self.close()
            raise

    async def _handshake(self, hello: codec.Hello) -> codec.Welcome:
        self._ws = await self._http.ws_connect(
            self.url, max_msg_size=codec.MAX_FRAME, heartbeat=30.0, ssl=self.ssl,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S))
        self._reader = asyncio.create_task(self._read_loop())
        await self.send(hello)
        reply = await self.recv()
        if not isinstance(reply, codec.Welcome):
            raise CloudError("bad_message", f"expected welcome, got {type(reply).__name__}")
        self.welcome = reply
        return reply

    async def send(self, msg) -> int:
        # a closed link reports why the verifier closed it when it said so (an Error before the
        # close, e.g. `draining`: a planned move, not a failure), else "disconnected"
        if self._ws is None or self._ws.closed:
            raise self._closed_by or CloudError("disconnected", "the link to the verifier is closed")
        data = codec.encode(msg)
        try:
            await self._ws.send_bytes(data)
        except (ConnectionError, RuntimeError) as err:
            raise (self._closed_by or CloudError("disconnected", f"send failed: {err}")) from err
        self.bytes_up += len(data)
        self.messages_up += 1
        if self.observer is not None:
            self.observer("up", msg)
        return len(data)

    async def recv(self, timeout: float | None = None):
        """The next message from the cloud; raises CloudError for Error messages and closes."""
        try:
            item = await asyncio.wait_for(self._inbox.get(), timeout or self.reply_timeout_s)
        except asyncio.TimeoutError as err:
            self._stalled = True  # closing it will not wait for a close handshake
            raise CloudError("timeout", f"no reply from the verifier within {timeout or self.reply_timeout_s:g} s") from err
        if isinstance(item, CloudError):
            self._inbox.put_nowait(item)  # keep reporting it to later callers
            raise item
        return item

    def poll(self) -> list:
        """Every message that has already arrived (non-blocking); raises on an Error message."""
        out = []
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, CloudError):
                self._inbox.put_nowait(item)
                if out:
                    return out
                raise item
            out.append(item)
        return out

    async def _read_loop(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                self.bytes_down += len(msg.data)
                self.messages_down += 1
                try:
                    decoded = codec.decode(msg.data)
                except codec.CodecError as err:
                    self._inbox.put_nowait(CloudError(err.code, f"bad frame from the verifier: {err.message}"))
                    return
                if self.observer is not None:
                    self.observer("down", decoded)
                self.epoch = max(self.epoch, newest_epoch(decoded))
                if isinstance(decoded, codec.Error):
                    self._closed_by = CloudError(decoded.code, decoded.message)
                    self._inbox.put_nowait(self._closed_by)
                    return
                self._inbox.put_nowait(decoded)
            self._inbox.put_nowait(CloudError("disconnected", "the verifier closed the connection"))
        except (aiohttp.ClientError, ConnectionError) as err:
            self._inbox.put_nowait(CloudError("disconnected", f"connection lost: {err}"))

    @property
    def connected(self) -> bool:
        """Open and not known to be broken (the reader stops at an Error, a close or a reset)."""
        reading = self._reader is not None and not self._reader.done()
        return self._ws is not None and not self._ws.closed and reading

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed and not self._stalled:
            try:
                await self._ws.send_bytes(codec.encode(codec.Close(reason="bye")))
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                pass
            try:  # bounded by ws_close; a broken transport may raise instead of answering
                await self._ws.close()
            except (ConnectionError, RuntimeError, aiohttp.ClientError, asyncio.TimeoutError):
                pass
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._http is not None:
            await self._http.close()


def newest_epoch(msg) -> int:
    """The epoch a message from the cloud names last (a Verdict's new one), 0 for none."""
    new = getattr(msg, "new_epoch", None)
    return new if new is not None else getattr(msg, "epoch", None) or 0


def client_ssl(url: str, ca_cert: str | None) -> ssl.SSLContext | bool:
    """What aiohttp's ssl= takes for this URL: wss:// verifies the verifier's certificate against
    the system's roots, or against ca_cert alone (a self-signed or private CA) when given."""
    if not url.startswith("wss://"):
        if ca_cert:
            raise ValueError(f"a CA certificate was given but {url} is not a wss:// URL")
        return True  # plain ws://: aiohttp ignores it
    if ca_cert is None:
        return True
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_cert)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx
