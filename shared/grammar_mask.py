"""A request's grammar (`grammar.py`) as token masks: the per-request hook the engine applies to the target's
logits before `processed_probs`, at the first token and at every node of a draft tree.

Exact under speculation: node i of a tree is masked with the grammar state after the committed tokens and the
path root -> i, which is the state plain decoding would be in had it produced that path. The masked target is then
the distribution every step samples from, with or without speculation: greedy acceptance compares draft tokens
with the masked argmax (so constrained greedy output is the same token for token), and rejection sampling keeps
the masked target law whatever the draft proposed (a draft token outside the grammar has p = 0 and is never
accepted). The tree is walked depth first; llguidance's `rollback` undoes a node's token when the walk leaves it,
so a tree costs one mask computation per node and no copies of the matcher.

The draft is masked alike (`Constraint.allowed_after`, through `DraftInput.grammar`): every proposer draws a node's
children from its draft distribution restricted to what the grammar allows after the node's path, so a tree holds
only nodes the masked target could accept. That changes acceptance, never output: the draft's distribution q is
whatever the proposer says it is (here the masked one), and verification is exact for any q.

The request's stop tokens end a turn, not the grammar: they are allowed exactly when the grammar accepts (the
output so far is complete), and never fed to the matcher. llguidance's own end-of-sequence token is allowed only
through them.
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path

import llguidance
import numpy as np
import torch

from specrelay.shared.draft_tree import DraftTree
from specrelay.shared.errors import SpecrelayError


class GrammarCompiler:
    """One model's tokenizer in llguidance's form (built once: ~0.1-1 s), compiling request grammars on it."""

    def __init__(self, tokenizer_json: str, vocab_size: int):
        """tokenizer_json: the text of tokenizer.json; vocab_size: the model's logits width (may exceed the
        tokenizer's: the extra ids are never allowed)."""
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size)

    @classmethod
    @functools.cache
    def from_dir(cls, model_dir: str, vocab_size: int) -> GrammarCompiler:
        return cls((Path(model_dir) / "tokenizer.json").read_text(), vocab_size)

    def start(self, grammar: str, stop_token_ids: tuple[int, ...]) -> Constraint:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SpecrelayError(f"the request's grammar does not compile: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size, stop_token_ids, self.tokenizer.eos_token)


class Constraint:
    """One request's matcher, holding the state after its committed tokens.

    The committed matcher only ever moves forward; every walk that rolls back (a tree's, a drafter's) runs on a
    copy of it. llguidance 1.9.1's matcher, rolled back and advanced again over many steps, came to allow a token
    it then refused (`",` after an object's key, issue 17's draft-masking tests on the pair): a copy taken after
    each commit is fresh state, and a copy costs far less than a mask."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, stop_token_ids: tuple[int, ...],
                 grammar_eos: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.stop_token_ids = [t for t in stop_token_ids if t < vocab_size]
        self.grammar_eos = grammar_eos
        self._draft: llguidance.LLMatcher | None = None  # the drafter's copy of the committed state

    def allowed(self, matcher: llguidance.LLMatcher | None = None) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next, in the current state (of `matcher`, a copy)."""
        matcher = matcher or self.matcher
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = torch.from_numpy(np.unpackbits(bits, bitorder="little")[: self.vocab_size].astype(bool))
        allowed[self.grammar_eos] = False
        if matcher.is_accepting() or matcher.is_stopped():
            allowed[self.stop_token_ids] = True
        return allowed

    def tree_allowed(self, tokens: list[int], parents: list[int]) -> torch.Tensor:
        """[num_nodes, vocab] bool: row i is what may follow node i (node 0, the root, is the last committed
        token). A node the grammar forbids after its parent keeps an all-True row: it can never be accepted, so
        its row is never sampled from, and its subtree is not walked."""
        matcher = self.matcher.deep_copy()
        rows = torch.ones(len(tokens), self.vocab_size, dtype=torch.bool)
        children: list[list[int]] = [[] for _ in tokens]
        for node in range(1, len(tokens)):
            children[parents[node]].append(node)
        stack: list[tuple[int, bool]] = [(0, False)]  # (node, leaving): leaving rolls its token back
        while stack:
            node, leaving = stack.pop()
            if leaving:
                matcher.rollback(1)
                continue
            if node > 0:
                token = tokens[node]
                if not rows[parents[node], token] or token in self.stop_token_ids:
                    continue  # off the grammar (or the end of the turn): nothing follows it
                if not matcher.consume_token(token):
                    raise SpecrelayError(f"the grammar refused an allowed token: {matcher.get_error()}")
                stack.append((node, True))
            rows[node] = self.allowed(matcher)
            stack += [(child, False) for child in reversed(children[node])]
        return rows

    def allowed_after(self, path: list[int]) -> torch.Tensor:
        """[vocab] bool: what may follow the committed tokens and then `path` (a drafter's node, root excluded);
        all False when the path leaves the grammar or ends the turn (nothing may be drafted under it)."""
        if self._draft is None:
            self._draft = self.matcher.deep_copy()
        matcher = self._draft
        if any(t in self.stop_token_ids for t in path) or (path and matcher.validate_tokens(path) < len(path)):
            return torch.zeros(self.vocab_size, dtype=torch.bool)
        if path and not matcher.consume_tokens(path):
            raise SpecrelayError(f"the grammar refused a validated path: {matcher.get_error()}")
        try:
            return self.allowed(matcher)
        finally:
            if path:
                matcher.rollback(len(path))

    def commit(self, tokens: list[int]) -> None:
        """Advance past newly committed tokens (stop tokens end the turn and are not grammar text)."""
        tokens = [t for t in tokens if t not in self.stop_token_ids]
        if tokens and not self.matcher.consume_tokens(tokens):
            raise SpecrelayError(f"a committed token broke the grammar: {self.matcher.get_error()}")
        if tokens:
            self._draft = None


def constrained(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """logits [num_rows, vocab] (or [vocab]) with every token the grammar forbids at -inf; None: unchanged."""
    if allowed is None:
        return logits
    return logits.masked_fill(~allowed.to(logits.device), float("-inf"))


class Constraints:
    """The engine's per-request hook: each request with a grammar gets its matcher at its first mask and keeps it
    while it lives (weakly keyed: a finished request takes it along). Before each mask the matcher catches up with
    the request's committed output, so the engine only asks for masks and never reports commits."""

    def __init__(self, compiler: GrammarCompiler):
        self.compiler = compiler
        self._matchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # request -> (Constraint, fed)

    @classmethod
    def for_model(cls, model_dir: str, vocab_size: int) -> Constraints | None:
        """The hook for a model directory; None when it has no tokenizer.json (requests with a grammar then fail)."""
        if not (Path(model_dir) / "tokenizer.json").is_file():
            return None
        return cls(GrammarCompiler.from_dir(str(model_dir), vocab_size))

    def state(self, request) -> Constraint:
        """`request`'s matcher (it has a grammar), caught up with its committed output: what its draft is masked
        with too (`DraftInput.grammar`)."""
        constraint, fed = self._matchers.get(request) or (
            self.compiler.start(request.params.grammar, request.params.stop_token_ids), 0)
        constraint.commit(request.output[fed:])
        self._matchers[request] = (constraint, len(request.output))
        return constraint

    def mask(self, request, logits: torch.Tensor, tree: DraftTree | None = None) -> torch.Tensor:
        """logits [num_rows, vocab] after `request`'s committed output (its tree's nodes, one row each, when a
        tree is given), with what the request's grammar forbids at -inf; unchanged without a grammar."""
        if request.params.grammar is None:
            return logits
        constraint = self.state(request)
        if tree is None:
            return constrained(logits, constraint.allowed())
        return constrained(logits, constraint.tree_allowed(tree.tokens, tree.parents))


def masked(constraints: Constraints | None, request, logits: torch.Tensor, tree: DraftTree | None = None):
    """`constraints.mask`, for an engine that may have none: a request with a grammar then fails (it must never
    come back unconstrained)."""
    if request.params.grammar is None:
        return logits
    if constraints is None:
        raise SpecrelayError("this verifier has no tokenizer to compile the request's grammar (structured outputs)")
    return constraints.mask(request, logits, tree)
