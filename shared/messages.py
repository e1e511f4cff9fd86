"""The typed handoffs between services, as msgspec Structs (msgpack on the bus; never pickle).

gateway --Generate--> verifier --TokenChunk (reply_to)--> gateway
gateway --Cancel----> verifier                       (client went away: free its KV; or release a held request)
gateway --Preempt---> verifier                       (the SLO schedule pauses a running request, or resumes it)
gateway --Continue--> verifier.continue.<holder> --TokenChunk (reply_to)--> gateway
                                                     (append tokens to a held request and decode on: a tool round)
verifier --DraftBatch--> drafter --DraftReply (reply_to)--> verifier
verifier --DraftFeedback--> drafter                 (what was accepted; the target's top-k for Token Recycling)
"""

from __future__ import annotations

import msgspec

from specrelay.shared.wire import WireTensor

# Stream names on the bus (prefixed by the bus itself).
GENERATE_STREAM = "verifier.generate"
CANCEL_STREAM = "verifier.cancel"
DRAFT_STREAM = "drafter.requests"
KV_STREAM = "verifier.kv"  # each verifier's KV block usage, for gateways in other processes (/metrics)


def continue_stream(holder: str) -> str:
    """The stream of one verifier replica's Continues: only the replica holding a request's KV can extend it."""
    return f"verifier.continue.{holder}"


class SamplingSpec(msgspec.Struct, frozen=True):
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 128
    stop_token_ids: list[int] = []  # the model's end-of-turn tokens; stop *strings* are the gateway's job
    # What the output must match: an llguidance grammar (shared/grammar.py), compiled by each side that samples
    # or drafts against its own tokenizer (shared/grammar_mask.py); None: free text.
    grammar: str | None = None
    # None: no logprobs; k in 0..20: each committed token's logprob plus the k most likely alternatives
    # (OpenAI chat `logprobs: true` + `top_logprobs: k`; completions `logprobs: k`)
    logprobs: int | None = None
    # token id -> bias in [-100, 100], added to the logits of the target AND the draft before anything else
    logit_bias: dict[int, float] = {}


class Generate(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    reply_to: str  # the gateway's reply channel for this request
    model: str = ""
    slo_class: str = "interactive"  # "interactive" | "deadline" | "batch"
    deadline_ms: float | None = None  # absolute, wall-clock epoch milliseconds
    arrival_ms: float = 0.0
    # > 0: a request that ends by a stop token keeps its KV for up to hold_s seconds, waiting for a Continue
    # (services/verifier/held.py); its last TokenChunk names the holder. Cancel releases it earlier.
    hold_s: float = 0.0
    # Prompt tokens whose KV existed before and was dropped (a held request expired and the gateway sent the whole
    # conversation again): prefilled again, they count as `recompute` in usage.pte, not as new `prefill`.
    evicted_tokens: int = 0


class Continue(msgspec.Struct, frozen=True, tag=True):
    """Append `token_ids` to a held request's sequence and decode on (a server-side tool round): only these tokens
    are prefilled. Sent to `continue_stream(holder)`. If the hold has expired the verifier answers with an error
    chunk and the sender falls back to a fresh Generate of the whole conversation."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingSpec  # max_tokens: what this turn may generate
    reply_to: str
    hold_s: float = 0.0  # hold again after this turn (another round may follow)
    tool_response_tokens: int = 0  # of token_ids, the tool answers' (usage.pte)


class Cancel(msgspec.Struct, frozen=True, tag=True):
    request_id: str
    # Set when a held turn ended with calls to the client's own tools: the client will come back with the whole
    # conversation and the tools' answers. The verifier's retention policy (verifier/client_retention.py) then
    # keeps, offloads or drops the KV instead of simply freeing it, and learns the pause per tool name.
    tool_names: list[str] = msgspec.field(default_factory=list)


class Preempt(msgspec.Struct, frozen=True, tag=True):
    """The gateway's SLO schedule pauses a running request to give its batch slot to one that cannot wait
    (`resume=False`), or lets it go on (`resume=True`). Sent on CANCEL_STREAM, which every replica reads; the one
    serving the request acts, the others ignore it. Paused, the request keeps its KV unless the verifier needs the
    blocks (then it is offloaded or dropped, and recomputed on resume); its output is the same either way."""

    request_id: str
    resume: bool = False


class RelayUsage(msgspec.Struct):
    """Prompt tokens covered by spans an earlier request decoded (RelayCaching), and what became of their KV."""

    span_tokens: int = 0
    reused_tokens: int = 0  # K/V kept (re-rotated to the new positions)
    recomputed_tokens: int = 0  # selected for recomputation


class PteParts(msgspec.Struct):
    """`usage.pte`: the request's cost in prefill token equivalents (shared/pte.py), with its parts."""

    total: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    recompute: float = 0.0
    tool_response_tokens: int = 0
    full_eviction_total: float = 0.0  # the paper's figure: every pause evicts, each turn prefills its context
    gamma: float = 0.0
    beta: float = 0.0  # per-decode-step constant in prefill tokens (0 for the analytic profile)
    source: str = ""  # where the profile came from: "file" | "calibrated" | "analytic" (shared/pte_profiles.py)
    turns: int = 0  # prefills: 1 + the tool rounds continued on held KV


class ProposerUsage(msgspec.Struct):
    accepted_tokens: int = 0
    drafted_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)
    spec_steps: int = 0  # verify forwards
    accepted_tokens: int = 0  # draft tokens the target accepted
    drafted_tokens: int = 0
    relay: RelayUsage | None = None  # None: no relayed span in the prompt
    pte: PteParts | None = None  # None: the verifier has no PTE profile
    proposers: dict[str, ProposerUsage] | None = None  # per proposer (a hybrid's suffix / head); None: not told


class TokenLogprob(msgspec.Struct, frozen=True):
    """A committed token's log-probability under the target's processed distribution (vLLM's
    `processed_logprobs`: log-softmax after logit_bias, the grammar mask and temperature — 1 for greedy — before
    top-k/top-p truncation), the same whether or not the token came through speculation."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []  # the k most likely tokens and their logprobs, most likely first


class TokenChunk(msgspec.Struct, frozen=True, tag=True):
    """Newly committed tokens of one request, in order. The last chunk has a finish_reason (and usage) or an
    error. `offset` is the index of token_ids[0] in the output: a request redelivered to another verifier replica
    starts again from 0, and the gateway drops what it already has."""

    request_id: str
    token_ids: list[int]
    offset: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    usage: Usage | None = None
    error: str | None = None
    holder: str | None = None  # set on the last chunk when the request's KV is held: the verifier to Continue
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, iff the request asked for logprobs


class DraftItem(msgspec.Struct, frozen=True):
    request_id: str
    tokens: list[int]  # every committed token; the last is the root
    sampling: SamplingSpec
    max_nodes: int
    # Where the output starts in `tokens`: a drafter replays the request's grammar (sampling.grammar) over the
    # output to mask its proposals with the state the target is masked with.
    num_prompt_tokens: int = 0
    # the verifier draws this request's tokens from positional noise (shared/seeded_draws.py): the drafter draws
    # with the same noise, and the verifier needs no q back
    positional_seed: int | None = None


class DraftBatch(msgspec.Struct, frozen=True, tag=True):
    step_id: int
    reply_to: str
    items: list[DraftItem]


class TreeMsg(msgspec.Struct, frozen=True):
    request_id: str
    tokens: list[int]
    parents: list[int]
    draft_probs: list[float]
    q: WireTensor | None = None  # [num_nodes, vocab] float32, sampling only
    sources: list[str] | None = None  # [num_nodes] which proposer drafted each node (a hybrid tree)


class DraftReply(msgspec.Struct, frozen=True, tag=True):
    step_id: int
    trees: list[TreeMsg]
    wants_hidden: bool = False  # the proposer continues from the target's hidden states: send them with feedback


class FeedbackItem(msgspec.Struct, frozen=True):
    request_id: str
    tree_tokens: list[int]
    accepted_nodes: list[int]
    target_topk: WireTensor  # [num_nodes, k] int64: the target's top-k after every tree node
    hidden: WireTensor | None = None  # [1 + num_accepted, hidden] float16: the target's last hidden states, root first


class DraftFeedback(msgspec.Struct, frozen=True, tag=True):
    items: list[FeedbackItem]
    released: list[str] = []  # finished or cancelled requests: free their draft KV


class KvReport(msgspec.Struct, frozen=True, tag=True):
    """A verifier's KV cache occupancy: sent when it changes, and every few seconds as a heartbeat."""

    verifier: str
    blocks_used: int
    blocks_total: int
    sent_s: float  # wall clock, seconds since the epoch
    blocks_kept: int = 0  # of blocks_used: conversations held across a pause (held.py, client_retention.py)
