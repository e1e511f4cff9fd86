"""SpecEngine: continuous batching with speculative decoding over token trees, in process.

Invariant per request: the target cache holds every committed token but the last one (the root of the next tree),
so one forward over the tree yields the target distribution after the root and after every node.

One step: choose the budget -> the drafter grows a tree per request -> one target forward over all trees (tree
attention) -> accept losslessly (kernels/spec_accept) -> compact the accepted path's KV -> commit tokens.

One way to run it, whoever drives: `execute(plan, draft)` runs a scheduler's StepPlan (handoffs.py: cancels, then
prefills, or a decode step) with `draft` proposing the trees; `step()` is a decode step with the in-process proposer.
A finished request's KV is freed at once unless its owner asked to keep it (`keep`: the verifier's scheduler holds
it for a Continue or publishes it first); a kept one is freed by `release`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch

from specrelay.kernels.spec_accept import spec_accept
from specrelay.services.drafter.base import TOPK, DraftInput, Proposer, Verified
from specrelay.services.verifier.budget import AdaptiveBudget
from specrelay.services.verifier.chunked_prefill import ChunkedPrefill
from specrelay.services.verifier.engine_fork import PromptForks
from specrelay.services.verifier.engine_pause import Pausing
from specrelay.services.verifier.draws import MODES, draw_mode, first_token, seeded_targets
from specrelay.services.verifier.engine_request import Request, StepOutput
from specrelay.services.verifier.engine_request import failed_output as _failed
from specrelay.services.verifier.engine_request import request_output as _output
from specrelay.services.verifier.handoffs import RequestOutput, StepPlan, StepResult
from specrelay.services.verifier.logprobs import token_logprobs
from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.grammar_mask import Constraints, masked
from specrelay.shared.modeling.kv_cache import BlockTable
from specrelay.shared.modeling.runner import ModelRunner, StepInput
from specrelay.shared.messages import TokenLogprob
from specrelay.shared.sampling import SamplingParams, make_generator, processed_probs
from specrelay.shared.sampling_wire import params_from_spec


log = logging.getLogger(__name__)

# The drafter of `execute`: (inputs, engine id -> request id) -> one tree per input, or None (no speculation)
Draft = Callable[[list[DraftInput], dict[int, str]], "list[DraftTree] | None"]


class SpecEngine(Pausing):
    def __init__(self, runner: ModelRunner, proposer: Proposer | None = None, max_nodes: int = 16,
                 adaptive: bool = True, speculate: bool | None = None, positional_seeds: bool = False):
        """speculate: plan draft trees (default: when an in-process proposer is given; a service that drafts over
        the bus passes True and calls plan / verify itself).
        positional_seeds: a seeded sampled request's output is the same whatever else runs (draws.py); off, its
        seed seeds its own random stream, verified by the rejection rule (the sampling-law tests run that)."""
        self.positional_seeds = positional_seeds
        self.runner = runner
        self.proposer = proposer
        speculate = proposer is not None if speculate is None else speculate
        self.max_nodes = max_nodes if speculate else 1
        self.budget = AdaptiveBudget(self.max_nodes) if adaptive else None
        self.running: list[Request] = []
        self.paused: dict[str, Request] = {}  # preempted, by the scheduler's request id: out of the batch
        self.chunked: ChunkedPrefill | None = None  # set: `execute` prefills admissions in chunks beside decoding
        self.constraints: Constraints | None = None  # structured outputs: grammar masks (shared/grammar_mask.py)
        self.num_prefilled_tokens = 0  # tokens run through prefill since start (not loaded, not decoded)
        self._ids = itertools.count()
        self.forks = PromptForks(runner.cache)

    def add(self, prompts: list[list[int]], params: list[SamplingParams], tables: list[BlockTable] | None = None, *,
            names: list[str] | None = None, keep: bool = False) -> list[Request]:
        """Prefill the prompts (short ones together in one forward) and commit each request's first token.
        `tables` may hold KV already loaded for a prefix of each prompt (prefix reuse): only the rest is prefilled.
        `keep`: a finished request's KV stays until `release`."""
        if any(not p for p in prompts):
            raise ValueError("empty prompt")
        tables = tables or [BlockTable() for _ in prompts]
        names = names or [""] * len(prompts)
        requests = [Request(next(self._ids), list(p), sp, table=t, generator=make_generator(sp), name=n, keep_kv=keep)
                    for p, sp, t, n in zip(prompts, params, tables, names)]
        for r in requests:
            assert r.table.num_tokens < len(r.prompt), "the last prompt token must be computed for its logits"
            r.stats.cached_tokens = r.table.num_tokens
        with self.forks.round():
            lead, follow = self.forks.split(requests, self.running)  # identical prompts: engine_fork.py
            self._prefill(lead)
            for r in follow:
                if (logits := self.forks.copy(r)) is None:
                    self._prefill([r])
                else:
                    self._commit_first(r, logits)
        for r in requests:
            if r.finish_reason is None:
                self.running.append(r)
            elif not r.keep_kv:
                self.runner.release(r.table)
        return requests

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill what each table lacks of its prompt (short ones together) and draw each first token."""
        self.num_prefilled_tokens += sum(len(r.prompt) - r.table.num_tokens for r in requests)
        short = [r for r in requests if len(r.prompt) - r.table.num_tokens <= self.runner.prefill_chunk]
        for start in range(0, len(short), 64):
            group = short[start : start + 64]
            steps = [StepInput(r.table, r.prompt[r.table.num_tokens :]) for r in group]
            for r, logits in zip(group, self.runner.forward(steps)):
                self._commit_first(r, logits)
        for r in requests:
            if r not in short:
                self._commit_first(r, self.runner.prefill(r.table, r.prompt[r.table.num_tokens :])[None])

    def extend(self, held: Request, token_ids: list[int], params: SamplingParams, name: str = "",
               keep: bool | None = None) -> Request:
        """Continue a finished request whose KV was kept: its sequence plus `token_ids` is the new request's
        prompt, and only `token_ids` are prefilled, on the held table.

        The KV holds every committed token but the last, which was sampled and never fed. A last token that is a
        stop token is dropped from the sequence (the caller's `token_ids` say how the turn ends, e.g. the
        template's own end-of-turn); any other is prefilled with `token_ids`. KV a draft path wrote past the last
        committed token (it ran beyond a stop) is cut first."""
        if held.finish_reason is None or held in self.running:
            raise ValueError("only a finished request can be extended")
        if not token_ids:
            raise ValueError("nothing to extend with")
        fed = len(held.tokens) - 1
        if held.table.num_tokens > fed:
            self.runner.cache.truncate(held.table, fed)
        stopped = bool(held.output) and held.output[-1] in held.params.stop_token_ids
        context = held.tokens[:-1] if stopped else held.tokens
        keep = held.keep_kv if keep is None else keep
        [req] = self.add([context + list(token_ids)], [params], [held.table], names=[name or held.name], keep=keep)
        return req

    def release(self, kv: Request | BlockTable) -> None:
        """Free a finished request's kept KV (once its owner has published what it wants), or a table's."""
        self.runner.release(kv.table if isinstance(kv, Request) else kv)

    def plan(self) -> list[DraftInput] | None:
        """What to ask the drafter for this step (one input per running request), or None: nothing to draft."""
        n = self.budget.choose(len(self.running)) if self.budget else self.max_nodes
        room = [min(n, self.runner.max_model_len - len(r.tokens) + 1) for r in self.running]
        if self.max_nodes <= 1 or not self.running or max(room) <= 1:
            return None
        return [DraftInput(r.request_id, r.tokens, r.params, max(1, k), r.generator, len(r.prompt),
                           self._draft_grammar(r), positional_seed=r.params.seed if self._mode(r) == "seeded" else None)
                for r, k in zip(self.running, room)]

    def _draft_grammar(self, r: Request):
        """The request's grammar state for an in-process proposer to mask its proposals with (a drafter service
        keeps its own: services/drafter/grammar.py)."""
        if r.params.grammar is None or self.constraints is None:
            return None
        return self.constraints.state(r)

    def verify(self, trees: list[DraftTree] | None, draft_s: float = 0.0) -> StepOutput:
        """One target forward over the trees of every running request (None: plain decoding), then acceptance,
        KV compaction and commit."""
        live = self.running
        trees = trees or [DraftTree.root_only(r.output[-1]) for r in live]
        t0 = time.perf_counter()
        logits, hidden = self.runner.forward_hidden([
            StepInput(r.table, t.tokens, positions=[r.table.num_tokens + d for d in t.depths()],
                      tree_mask=t.ancestor_mask(), logits_rows=list(range(t.num_nodes)))
            for r, t in zip(live, trees)])
        # the target's logits at every node, masked by the grammar state after the node's path
        logits = [masked(self.constraints, r, lg, t) for r, lg, t in zip(live, logits, trees)]
        paths, next_tokens = self._accept(live, trees, logits)
        verify_s = time.perf_counter() - t0
        if self.budget:
            self.budget.observe_verify(sum(t.num_nodes for t in trees), verify_s)
            if draft_s:
                self.budget.observe_draft(draft_s)
        out = StepOutput()
        for r, t, lg, hid, path, nxt in zip(live, trees, logits, hidden, paths, next_tokens):
            self._compact(r, t, path)
            r.stats.steps += 1
            r.stats.accepted_tokens += len(path)
            r.stats.drafted_tokens += t.num_nodes - 1
            if t.sources is not None and len(t.sources) == t.num_nodes:
                r.stats.credit(t.sources, path)
            r.stats.draft_s += draft_s / len(live)
            r.stats.verify_s += verify_s / len(live)
            if self.budget:
                self.budget.observe_acceptance(path, t.num_nodes)
            out.verified.append(Verified(r.request_id, t, lg.topk(min(TOPK, lg.shape[-1])).indices, path,
                                         hidden=hid[[0, *path]]))
            before = len(r.output)
            tokens = [t.tokens[i] for i in path] + [nxt]
            # token j was drawn after the root (j = 0) or after accepted node path[j - 1]
            logprobs = token_logprobs(lg[[0, *path]], r.params, tokens) if r.logprobs is not None else None
            self._commit(r, tokens, logprobs)
            out.new_tokens[r.request_id] = r.output[before:]
        out.finished = [r for r in live if r.finish_reason is not None]
        self.running = [r for r in live if r.finish_reason is None]
        for r in out.finished:
            if not r.keep_kv:
                self.runner.release(r.table)
        return out

    def step(self) -> StepOutput:
        """A decode step with the in-process proposer: plan -> draft -> verify."""
        if not self.running:
            return StepOutput()
        out, _ = self._decode(self.proposer.propose if self.proposer is not None else None)
        if self.proposer is not None:
            self.proposer.observe(out.verified)
            for r in out.finished:
                self.proposer.release(r.request_id)
        return out

    def _decode(self, draft: Callable[[list[DraftInput]], list[DraftTree] | None] | None) -> tuple[StepOutput, bool]:
        """plan -> draft -> verify; (the step's output, whether trees came). A draft that fails or comes back
        empty costs the step its speculation: it verifies root-only trees."""
        inputs = self.plan()
        trees, draft_s = None, 0.0
        if inputs is not None and draft is not None:
            t0 = time.perf_counter()
            trees = draft(inputs)
            draft_s = time.perf_counter() - t0
        return self.verify(trees, draft_s), trees is not None

    def execute(self, plan: StepPlan, draft: Draft | None = None) -> StepResult:
        """Run a scheduler's plan: stop the cancelled, prefill the Continues and Generates (each on its own: one
        that fails fails alone, its KV freed), or one decode step over every running request (a failure fails
        them all). The plan's requests are kept when they finish: the scheduler holds or releases their KV."""
        result = StepResult()
        by_name = {r.name: r for r in [*self.running, *(self.chunked.queue if self.chunked is not None else [])]}
        for name in plan.cancelled:
            if (req := by_name.get(name) or self.paused.get(name)) is not None:
                self.cancel(req.request_id)
                result.outputs.append(_output(req))
        self.execute_pauses(plan, result)
        for resume in plan.resumes:
            try:
                req = self.extend(resume.kv, resume.token_ids, params_from_spec(resume.sampling), resume.request_id)
            except Exception as e:  # noqa: BLE001 - this Continue alone fails; its held KV goes with it
                log.exception("engine: the Continue of %s failed", resume.request_id)
                self.release(resume.kv)
                result.outputs.append(_failed(resume.request_id, f"the verifier could not continue this request: {e}"))
                continue
            result.outputs.append(_output(req, 0, started=True))
        with self.forks.round():  # identical prompts admitted in this step are prefilled once (engine_fork.py)
            self._execute_admits(plan, result)
        if plan.decode and self.running:
            self._execute_decode(result, draft)
        if self.chunked is not None:
            self._execute_chunk(result)
        return result

    def _execute_admits(self, plan: StepPlan, result: StepResult) -> None:
        for admit in plan.admits:
            table = admit.table if admit.table is not None else BlockTable()
            try:
                if self.chunked is not None:
                    result.outputs.append(self._start_chunked(admit, table))
                    continue
                [req] = self.add([admit.prompt], [params_from_spec(admit.sampling)], [table], names=[admit.request_id],
                                 keep=True)
            except Exception as e:  # noqa: BLE001 - this request alone fails (its prefill); the others go on
                log.exception("engine: admitting %s failed", admit.request_id)
                self.runner.release(table)
                result.outputs.append(_failed(admit.request_id, f"the verifier could not start this request: {e}"))
                continue
            admit.cached_tokens += self.forks.copied.get(req.request_id, 0)  # a copy is prefilled by nobody
            result.outputs.append(_output(req, 0, started=True))

    def _start_chunked(self, admit, table: BlockTable) -> RequestOutput:
        """An admission whose prompt is prefilled a chunk per step from now on (chunked_prefill.py)."""
        params = params_from_spec(admit.sampling)
        req = Request(next(self._ids), list(admit.prompt), params, table=table, generator=make_generator(params),
                      name=admit.request_id, keep_kv=True)
        req.stats.cached_tokens = table.num_tokens
        self.chunked.start(req)
        self.num_prefilled_tokens += len(req.prompt) - table.num_tokens
        return RequestOutput(req.name, [], len(table.blocks))

    def _execute_chunk(self, result: StepResult) -> None:
        """One chunk of the prompts being prefilled; a prompt it completes draws its first token and runs."""
        try:
            done = self.chunked.step()
        except Exception as e:  # noqa: BLE001 - the chunk's requests fail; the replica serves the next ones
            log.exception("engine: a prefill chunk failed")
            for r in self.chunked.remove_all():
                self.runner.release(r.table)
                result.outputs.append(_failed(r.name, f"the verifier could not start this request: {e}"))
            return
        for r, logits in done:
            self._commit_first(r, logits[None])
            if r.finish_reason is None:
                self.running.append(r)
            result.outputs.append(_output(r, 0, started=True))
        result.outputs += [RequestOutput(r.name, [], len(r.table.blocks)) for r in self.chunked.queue]

    def _execute_decode(self, result: StepResult, draft: Draft | None) -> None:
        live = list(self.running)
        result.decoded, result.names = True, {r.request_id: r.name for r in live}
        before = {r.request_id: len(r.output) for r in live}
        try:
            out, drafted = self._decode(draft and (lambda inputs: draft(inputs, result.names)))
        except Exception as e:  # noqa: BLE001 - the step's requests fail; the replica serves the next ones
            for r in live:
                self.cancel(r.request_id)
            log.exception("engine: a decode step failed")
            result.outputs += [_failed(r.name, f"the verifier failed on this request: {e}") for r in live]
            return
        result.verified = out.verified if drafted else []
        result.released = [r.name for r in out.finished]
        result.outputs += [_output(r, before[r.request_id]) for r in live]

    def cancel(self, request_id: int) -> Request | None:
        """Stop a request now and free its KV (the client went away, or a stop string matched)."""
        prefilling = self.chunked.queue if self.chunked is not None else []
        req = next((r for r in [*self.running, *self.paused.values(), *prefilling] if r.request_id == request_id),
                   None)
        if req is not None:
            if req in self.running:
                self.running.remove(req)
            self.paused.pop(req.name, None)
            if self.chunked is not None:
                self.chunked.remove(req)
            req.finish_reason = "cancelled"
            self.runner.release(req.table)
            if self.proposer is not None:
                self.proposer.release(request_id)
        return req

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Request]:
        requests = self.add(prompts, [params] * len(prompts))
        while self.running:
            self.step()
        return requests

    def _accept(self, live, trees, logits) -> tuple[list[list[int]], list[int]]:
        """Greedy, positionally seeded and sampled requests are accepted in one batched call each; returns accepted
        paths and next tokens. logits: per request [num_nodes, vocab], grammar-masked."""
        paths: list[list[int]] = [[] for _ in live]
        next_tokens = [0] * len(live)
        for mode in MODES:
            idx = [i for i, r in enumerate(live) if self._mode(r) == mode]
            if not idx:
                continue
            sizes = [trees[i].num_nodes for i in idx]
            cu = torch.tensor([0, *itertools.accumulate(sizes)])
            probs = [processed_probs(logits[i], live[i].params) for i in idx]
            if mode == "seeded":  # the target's draw at every node, one-hot: the greedy walk accepts exactly those
                probs = [seeded_targets(p, live[i].params.seed, len(live[i].tokens), trees[i])
                         for i, p in zip(idx, probs)]
            probs = torch.cat(probs)
            greedy = mode != "sampled"
            q = None if greedy else torch.cat([self._q(trees[i], probs.shape[-1]) for i in idx])
            if mode == "seeded":  # no test to draw for, and the request's stream stays untouched
                uniforms, final = torch.zeros(sum(sizes)), torch.zeros(len(idx))
            else:
                uniforms = torch.cat([torch.rand(s, generator=live[i].generator) for i, s in zip(idx, sizes)])
                final = torch.cat([torch.rand(1, generator=live[i].generator) for i in idx])
            result = spec_accept(torch.tensor([tok for i in idx for tok in trees[i].tokens]),
                                 torch.tensor([p for i in idx for p in trees[i].parents]),
                                 cu, probs, q, uniforms, final, greedy)
            for j, i in enumerate(idx):
                paths[i] = result.accepted_nodes[j, : int(result.num_accepted[j])].tolist()
                next_tokens[i] = int(result.next_token[j])
        return paths, next_tokens

    def _mode(self, r: Request) -> str:
        return draw_mode(r.params, self.positional_seeds)

    @staticmethod
    def _q(tree: DraftTree, vocab: int) -> torch.Tensor:
        """[num_nodes, vocab]; a tree without distributions (root only) has nothing to verify against."""
        return tree.q if tree.q is not None else torch.zeros(tree.num_nodes, vocab)

    def _compact(self, r: Request, tree: DraftTree, path: list[int]) -> None:
        """Node i of the tree was written at context + i; the accepted path must sit at context + 1, + 2, ..."""
        ctx, bs = r.table.num_tokens - tree.num_nodes, self.runner.cache.block_size
        moves = [(ctx + node, ctx + 1 + j) for j, node in enumerate(path) if node != 1 + j]
        if moves:
            slot = lambda p: r.table.blocks[p // bs] * bs + p % bs  # noqa: E731
            self.runner.cache.move_slots([slot(s) for s, _ in moves], [slot(d) for _, d in moves])
        self.runner.cache.truncate(r.table, ctx + 1 + len(path))

    def _commit(self, r: Request, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        for j, tok in enumerate(tokens):
            r.output.append(tok)
            if logprobs is not None:
                r.logprobs.append(logprobs[j])
            if tok in r.params.stop_token_ids:
                r.finish_reason = "stop"
            elif len(r.output) >= r.params.max_tokens or len(r.tokens) >= self.runner.max_model_len:
                r.finish_reason = "length"
            if r.finish_reason:
                return

    def _commit_first(self, r: Request, logits: torch.Tensor) -> None:
        """The token after the prompt, from the target's logits after it ([1, vocab]); a fork leader's are kept."""
        self.forks.prefilled(r, logits)
        logits = masked(self.constraints, r, logits)
        token = first_token(processed_probs(logits, r.params), r.params, self._mode(r), len(r.tokens), r.generator)
        self._commit(r, [token], token_logprobs(logits, r.params, [token]) if r.logprobs is not None else None)
