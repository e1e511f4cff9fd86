"""One request's round trip with the verifier: publish `Generate`, read `TokenChunk`s, turn them into text.

The verifier knows tokens; the gateway owns everything about text: incremental detokenization, stop strings, and
ending the request early. Whenever the gateway stops listening before the verifier has finished — a stop string,
a client that went away, a timeout, a handler cancelled — it publishes `Cancel`, so the verifier stops decoding and
frees the request's KV blocks instead of generating into the void.

A Redis restart (the bus counts them: `Bus.resets`) loses what the streams held, so a request may be gone without
anyone to say so. Its verifier, if it had the request, keeps it in memory and goes on streaming (replies are retried
through the outage). So after a restart: a request with no token yet is published again, under the same request
id (a verifier that already has it serves it once: admission is idempotent by request id); a request already
streaming must hear from its verifier within `Timeouts.after_reset_s`, or it ends with an error instead of waiting
for `chunk_s`. A gap in the token offsets (replies lost past the bus's retries) is an error, never spliced text.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import msgspec

from specrelay.services.gateway.detok import Decoder, TextStream
from specrelay.services.gateway.sse import ClientGone
from specrelay.shared.bus import Bus, BusUnavailable
from specrelay.shared.messages import (
    CANCEL_STREAM,
    GENERATE_STREAM,
    Cancel,
    Continue,
    Generate,
    TokenChunk,
    TokenLogprob,
    Usage,
    continue_stream,
)

POLL_S = 0.25  # how often a wait for tokens looks at the client's connection


@dataclass(frozen=True)
class Timeouts:
    chunk_s: float = 300.0  # longest silence from the verifier before the request fails (queueing included)
    cancel_grace_s: float = 1.0  # after a stop string: how long to wait for the verifier's final usage
    # A Continue's first chunk: its holder may be gone (crashed, stopped) and nobody else reads its stream. The
    # turn then ends "timeout" with no tokens and the sender falls back to a fresh Generate. None: chunk_s.
    continue_s: float | None = None
    after_reset_s: float = 10.0  # after a Redis restart: longest silence of a request that had started streaming


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "error" | "cancelled" | "timeout"
    num_tokens: int  # tokens behind the visible text (to the end of a stop string)
    usage: Usage | None = None  # the verifier's, when it arrived
    error: str | None = None
    stop_string: bool = False
    holder: str | None = None  # the verifier holding the request's KV for a Continue (Generate.hold_s)


@dataclass
class Timing:
    arrival_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    last_token_s: float | None = None


class Generation:
    def __init__(self, bus: Bus, tokenizer: Decoder, generate: Generate, stops: list[str],
                 client_gone: Callable[[], bool], timeouts: Timeouts = Timeouts(), timing: Timing | None = None,
                 resume: tuple[str, Continue] | None = None):
        """resume: (holder, Continue) to go on with a held request instead of publishing `generate` (a tool
        round, services/verifier/held.py); `generate` still names the request."""
        self.bus = bus
        self.generate = generate
        self.resume = resume
        self.text = TextStream(tokenizer, stops)
        self.client_gone = client_gone
        self.timeouts = timeouts
        self.timing = timing or Timing()
        self.finish: Finish | None = None
        self._verifier_done = False  # a chunk with finish_reason or error arrived: nothing left to cancel
        self._cancelled = False
        self._num_received = 0  # output tokens received so far (TokenChunk.offset counts in the same units)
        self.logprobs: list[TokenLogprob] = []  # one per received token, when the request asked for logprobs
        self._logprobs_taken = 0

    async def events(self) -> AsyncIterator[str]:
        """Visible text deltas; when it ends, `self.finish` says why. Raises `ClientGone` if the client left
        while we waited for tokens (the request is cancelled first)."""
        channel = self.bus.open_reply_channel(TokenChunk)
        try:
            resets = self.bus.resets
            if not await self._publish(channel.name):
                return
            idle_s, limit_s = 0.0, self._first_chunk_s()
            while self.finish is None:
                try:
                    chunk = await _get(channel, POLL_S)
                except TimeoutError:
                    if self.client_gone():
                        raise ClientGone() from None
                    idle_s += POLL_S
                    if self.bus.resets != resets:  # Redis restarted: the request may be lost with its stream
                        resets = self.bus.resets
                        if self._num_received == 0:
                            if not await self._publish(channel.name):
                                return
                            idle_s, limit_s = 0.0, self._first_chunk_s()
                        else:
                            idle_s, limit_s = 0.0, min(limit_s, self.timeouts.after_reset_s)
                    if idle_s >= limit_s:
                        who = "the verifier" if self.resume is None else f"the verifier holding it ({self.resume[0]})"
                        self.finish = Finish("timeout", self.text.num_tokens,
                                             error=f"{who} sent nothing for {limit_s:g} s")
                    continue
                if chunk is None:  # the bus closed under us (shutdown)
                    self.finish = Finish("error", self.text.num_tokens, error="the gateway is shutting down")
                    break
                idle_s, limit_s = 0.0, self.timeouts.chunk_s
                async for text in self._on_chunk(chunk, channel):
                    yield text
        finally:
            if not self._verifier_done:
                await self._cancel()
            channel.close()

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs of the tokens behind the text so far (those usage bills) not taken before."""
        end = min(self.text.num_tokens, len(self.logprobs))
        taken, self._logprobs_taken = self.logprobs[self._logprobs_taken:end], max(end, self._logprobs_taken)
        return taken

    async def _publish(self, reply_to: str) -> bool:
        """Send the request (again, after a Redis restart); False, with `finish` set, if the bus is unavailable."""
        try:
            if self.resume is None:
                await self.bus.publish(GENERATE_STREAM, _with_reply_to(self.generate, reply_to))
            else:
                holder, resume = self.resume
                await self.bus.publish(continue_stream(holder), _with_reply_to(resume, reply_to))
        except BusUnavailable as e:
            self.finish = Finish("error", self.text.num_tokens, error=str(e))
            self._verifier_done = True  # nobody has it: nothing to cancel (and the bus is away)
            return False
        return True

    def _first_chunk_s(self) -> float:
        if self.resume is None or self.timeouts.continue_s is None:
            return self.timeouts.chunk_s
        return min(self.timeouts.continue_s, self.timeouts.chunk_s)

    async def _cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            # Shielded: a handler being cancelled (client gone) must still tell the verifier to free the KV.
            try:
                await asyncio.shield(self.bus.publish(CANCEL_STREAM, Cancel(self.generate.request_id)))
            except BusUnavailable:  # the verifier serves it to its end; the reply is dropped with the channel
                pass

    async def _on_chunk(self, chunk: TokenChunk, channel) -> AsyncIterator[str]:
        # A request redelivered to another verifier replica is generated again from offset 0: keep only tokens
        # beyond those already received (the replica's earlier tokens are the same under greedy or a seed).
        if chunk.offset > self._num_received:  # replies were lost (the bus was away past its retries)
            self.finish = Finish("error", self.text.num_tokens, error=f"tokens {self._num_received} to "
                                 f"{chunk.offset - 1} were lost on the bus")
            return
        skip = max(self._num_received - chunk.offset, 0)
        token_ids = chunk.token_ids[skip:]
        if chunk.logprobs is not None:
            self.logprobs += chunk.logprobs[skip:skip + len(token_ids)]
        self._num_received = max(self._num_received, chunk.offset + len(chunk.token_ids))
        if token_ids:
            now = time.monotonic()
            if self.timing.first_token_s is None:
                self.timing.first_token_s = now
            self.timing.last_token_s = now
        if chunk.error is not None or chunk.finish_reason is not None:
            self._verifier_done = True
        if chunk.error is not None:
            self.finish = Finish("error", self.text.num_tokens, chunk.usage, error=chunk.error)
            return
        result = self.text.push(token_ids)
        if result.stopped and chunk.finish_reason is None:
            await self._cancel()  # before showing the text: every step the verifier takes now is wasted
        if result.text:
            yield result.text
        if result.stopped:
            self.finish = Finish("stop", self.text.num_tokens, chunk.usage, stop_string=True)
            if chunk.finish_reason is None:
                self.finish.usage = await _final_usage(channel, self.timeouts.cancel_grace_s)
                self._verifier_done = True  # cancelled; whatever it still sends is dropped with the channel
            return
        if chunk.finish_reason is not None:
            tail = self.text.finish()
            if tail.text:
                yield tail.text
            reason = "stop" if tail.stopped else chunk.finish_reason
            self.finish = Finish(reason, self.text.num_tokens, chunk.usage, stop_string=tail.stopped,
                                 holder=chunk.holder)


async def _get(channel, timeout_s: float) -> TokenChunk | None:
    # asyncio.timeout (3.11+) costs a timer; wait_for on 3.11 also wraps the read in a new task, per token.
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(timeout_s):
            return await channel.get()
    return await channel.get(timeout_s=timeout_s)


def _with_reply_to(generate: Generate | Continue, reply_to: str) -> Generate | Continue:
    return msgspec.structs.replace(generate, reply_to=reply_to)


async def _final_usage(channel, grace_s: float) -> Usage | None:
    """After a Cancel the verifier answers with a last chunk (finish_reason "cancelled") carrying usage: wait for
    it briefly; the response does not depend on it."""
    deadline = time.monotonic() + grace_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            chunk = await channel.get(timeout_s=left)
        except TimeoutError:
            return None
        if chunk is None:
            return None
        if chunk.finish_reason is not None or chunk.error is not None:
            return chunk.usage
    return None
