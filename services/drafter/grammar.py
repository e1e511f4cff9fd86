"""The drafter service's grammar states: one llguidance matcher per constrained request, replaying its output
(`DraftItem.tokens` past `num_prompt_tokens`) so that its proposals are masked with the state the verifier masks
the target with (shared/grammar_mask.py). The target is masked anyway, so a state that cannot be built only costs
acceptance: the request is drafted unmasked and its output is the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from specrelay.shared.errors import SpecrelayError
from specrelay.shared.grammar_mask import Constraint, GrammarCompiler
from specrelay.shared.messages import DraftItem

log = logging.getLogger(__name__)


@dataclass
class _State:
    grammar: str
    num_prompt_tokens: int
    constraint: Constraint
    fed: list[int]  # the output tokens the matcher has consumed


class DraftGrammars:
    def __init__(self, compiler: GrammarCompiler | None):
        """compiler: the target's tokenizer (the draft shares its vocabulary); None: requests are drafted
        unmasked (a model directory without tokenizer.json)."""
        self.compiler = compiler
        self._states: dict[str, _State] = {}

    @classmethod
    def for_model(cls, model_dir: str, vocab_size: int) -> DraftGrammars:
        from pathlib import Path

        has_tokenizer = (Path(model_dir) / "tokenizer.json").is_file()
        return cls(GrammarCompiler.from_dir(model_dir, vocab_size) if has_tokenizer else None)

    def state(self, item: DraftItem) -> Constraint | None:
        """The request's grammar state after its committed output; None: no grammar, or none could be built."""
        grammar = item.sampling.grammar
        if grammar is None or self.compiler is None:
            return None
        output = item.tokens[item.num_prompt_tokens:]
        state = self._states.get(item.request_id)
        if (state is None or state.grammar != grammar or state.num_prompt_tokens != item.num_prompt_tokens
                or output[: len(state.fed)] != state.fed):  # a new request, or one that started over elsewhere
            state = None
        try:
            if state is None:
                constraint = self.compiler.start(grammar, tuple(item.sampling.stop_token_ids))
                state = _State(grammar, item.num_prompt_tokens, constraint, [])
            state.constraint.commit(output[len(state.fed):])
        except SpecrelayError as e:
            log.warning("drafter: request %s drafted without its grammar: %s", item.request_id, e)
            self._states.pop(item.request_id, None)
            return None
        state.fed = list(output)
        self._states[item.request_id] = state
        return state.constraint

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)
