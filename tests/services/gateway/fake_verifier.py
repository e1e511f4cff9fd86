"""A scripted stand-in for the verifier: consumes `Generate` and `Cancel` from the bus and answers with
`TokenChunk`s, so the gateway is tested on its own.

The "model" reads the decoded prompt and answers by rule (deterministic, like greedy decoding):
  * tools offered, a question about the weather and no tool response yet -> a hermes `get_weather` call;
  * a tool response in the last turn -> "The weather in Paris: <response>.";
  * a prompt that ends inside a forced call (`"arguments": `) -> the call's arguments;
  * "FAIL" in the last turn -> two tokens, then an error chunk; "SILENT" -> no answer at all;
  * "BROKEN" with tools offered -> a call that is not valid JSON;
  * otherwise `STORY` (non-ASCII on purpose), repeated.
With `holder` set it claims to hold every turn that asked for `hold_s` and ended by its stop token, yet never reads
that holder's Continue stream: a replica that died while holding a tool round's KV.
KV blocks are counted like a paged cache (a block per `block_size` tokens of prompt + output, freed at the end or
on Cancel), so tests can check that a cancelled request gives its blocks back.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

from specrelay.shared.bus import Bus
from specrelay.shared.messages import (
    CANCEL_STREAM,
    GENERATE_STREAM,
    Cancel,
    Generate,
    TokenChunk,
    TokenLogprob,
    Usage,
)

STORY = "Once upon a time, a café in Zürich served naïve crêpes to 12 robots 🤖 — each one said thanks. "
TOOL_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# the rest of a forced call, then the same call again and again (until max_tokens cuts one)
REPEATED_CALLS = 'get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' + f"\n{TOOL_CALL}" * 20


@dataclass
class FakeVerifier:
    bus: Bus
    tokenizer: object
    tokens_per_chunk: int = 3
    delay_s: float = 0.0  # between chunks
    block_size: int = 16
    blocks_total: int = 4096
    cached_tokens: int = 8  # reported as reused prompt tokens (usage pass-through)
    replay_at: int | None = None  # after this many tokens, send them all again from offset 0 (a redelivery)
    holder: str | None = None  # named on the last chunk of a held turn; nobody answers its Continues
    generates: list[Generate] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)  # request id -> finish reason sent
    blocks: dict[str, int] = field(default_factory=dict)  # request id -> blocks held
    _cancelled: set[str] = field(default_factory=set)
    _tasks: set[asyncio.Task] = field(default_factory=set)

    @property
    def blocks_used(self) -> int:
        return sum(self.blocks.values())

    async def run(self) -> None:
        await asyncio.gather(self._consume_generates(), self._consume_cancels())

    async def _consume_generates(self) -> None:
        async for delivery in self.bus.consume(GENERATE_STREAM, "verifier", "fake-0", Generate):
            self.generates.append(delivery.msg)
            task = asyncio.create_task(self._generate(delivery.msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            await delivery.ack()

    async def _consume_cancels(self) -> None:
        async for delivery in self.bus.consume(CANCEL_STREAM, "verifier", "fake-0", Cancel):
            self.cancels.append(delivery.msg.request_id)
            self._cancelled.add(delivery.msg.request_id)
            await delivery.ack()

    def reply_text(self, prompt: str) -> str:
        last_turn = prompt.rsplit("<|im_start|>", 2)[-2] if prompt.count("<|im_start|>") >= 2 else prompt
        if prompt.endswith('"arguments": '):
            return '{"city": "Paris"}}\n</tool_call>'
        if prompt.endswith('{"name": "') and "REPEAT" in last_turn:  # SmolLM2 with parallel calls allowed
            return REPEATED_CALLS
        if prompt.endswith('{"name": "'):
            return 'get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        if "FAIL" in last_turn:
            return "about to fail"
        if "BROKEN" in last_turn and "<tools>" in prompt:
            return 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": }}\n</tool_call>'
        if "<tool_response>" in last_turn:
            # any prompt at all may reach here (the fuzz test sends bare token ids): never fail to answer
            answer = last_turn.split("<tool_response>", 1)[1].split("</tool_response>", 1)[0].strip("\n")
            return f"The weather in Paris: {answer}."
        if "<tools>" in prompt and "weather" in last_turn.lower():
            return TOOL_CALL
        return STORY * 20

    async def _generate(self, g: Generate) -> None:
        prompt = self.tokenizer.decode(g.prompt_token_ids)
        script = self.tokenizer.encode(self.reply_text(prompt))
        eos = g.sampling.stop_token_ids[0] if g.sampling.stop_token_ids else None
        if eos is not None:
            script.append(eos)
        fail = "FAIL" in prompt.rsplit("<|im_start|>", 2)[-2] if prompt.count("<|im_start|>") >= 2 else False
        self.blocks[g.request_id] = math.ceil(len(g.prompt_token_ids) / self.block_size)
        if "SILENT" in prompt:
            self.blocks.pop(g.request_id)
            return
        out: list[int] = []
        replayed = False
        try:
            while True:
                if g.request_id in self._cancelled:
                    await self._finish(g, out, "cancelled")
                    return
                if fail and len(out) >= 2:
                    failed = TokenChunk(g.request_id, [], offset=len(out), finish_reason="error",
                                        error="CUDA fell over")
                    await self.bus.reply(g.reply_to, failed)
                    self.finished[g.request_id] = "error"
                    return
                room = g.sampling.max_tokens - len(out)
                piece = script[len(out):len(out) + min(self.tokens_per_chunk, room)]
                out += piece
                self.blocks[g.request_id] = math.ceil((len(g.prompt_token_ids) + len(out)) / self.block_size)
                reason = None
                if piece and piece[-1] == eos:
                    reason = "stop"
                elif len(out) >= g.sampling.max_tokens or len(out) >= len(script):
                    reason = "length"
                if reason is not None:
                    await self._finish(g, out, reason, piece)
                    return
                offset = len(out) - len(piece)
                await self.bus.reply(g.reply_to, TokenChunk(g.request_id, piece, offset=offset,
                                                            logprobs=fake_logprobs(g, piece, offset)))
                if self.replay_at is not None and len(out) >= self.replay_at and not replayed:
                    # as if redelivered to a new replica: everything again from offset 0
                    replayed = True
                    await self.bus.reply(g.reply_to, TokenChunk(g.request_id, list(out), offset=0,
                                                                logprobs=fake_logprobs(g, out, 0)))
                await asyncio.sleep(self.delay_s)
        finally:
            self.blocks.pop(g.request_id, None)

    async def _finish(self, g: Generate, out: list[int], reason: str, piece: list[int] | None = None) -> None:
        usage = Usage(prompt_tokens=len(g.prompt_token_ids), completion_tokens=len(out),
                      cached_tokens=min(self.cached_tokens, len(g.prompt_token_ids)), spec_steps=len(out),
                      accepted_tokens=len(out) // 2, drafted_tokens=len(out))
        self.blocks.pop(g.request_id, None)
        self.finished[g.request_id] = reason
        piece = piece or []
        holder = self.holder if reason == "stop" and g.hold_s > 0 else None
        offset = len(out) - len(piece)
        await self.bus.reply(g.reply_to, TokenChunk(g.request_id, piece, offset=offset, finish_reason=reason,
                                                    usage=usage, holder=holder,
                                                    logprobs=fake_logprobs(g, piece, offset)))


def fake_logprobs(g: Generate, token_ids: list[int], offset: int) -> list[TokenLogprob] | None:
    """What the verifier reports when asked (SamplingSpec.logprobs = k): output token i has logprob -i/100 (so a
    test can tell which position an entry is), and its k alternatives are the token itself, then ids 1, 2, ...
    at lower logprobs, most likely first."""
    k = g.sampling.logprobs
    if k is None:
        return None
    out = []
    for i, token in enumerate(token_ids, start=offset):
        logprob = -i / 100
        top = [(token, logprob), *((alt, logprob - alt) for alt in range(1, k))][:k]
        out.append(TokenLogprob(token, logprob, top))
    return out
