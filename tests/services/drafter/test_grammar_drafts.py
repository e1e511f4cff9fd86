"""The draft's proposals are masked by the request's grammar (issue 17): every proposer (draft-model tree and
chain, Token Recycling, suffix decoding), in process and behind the drafter service, puts only nodes the grammar
allows into a constrained request's tree, judged by the target's own tree mask; constrained greedy output stays the
same with and without speculation; and the acceptance with the draft masked is printed beside it unmasked."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from specrelay.services.drafter.draft_model import DraftModelProposer
from specrelay.services.drafter.grammar import DraftGrammars
from specrelay.services.drafter.recycling import TokenRecyclingProposer
from specrelay.services.drafter.service import Drafter
from specrelay.services.drafter.suffix import SuffixProposer
from specrelay.services.verifier.engine import SpecEngine
from specrelay.shared.grammar import TOOL_MARKERS, json_grammar, tool_call_grammar
from specrelay.shared.grammar_mask import Constraints, GrammarCompiler
from specrelay.shared.messages import DraftBatch, DraftItem, SamplingSpec
from specrelay.shared.modeling.loader import load_model
from specrelay.shared.modeling.runner import ModelRunner
from specrelay.shared.sampling import SamplingParams
from specrelay.shared.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parents[3] / "models"
VOCAB = 4096
ANSWER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                           "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}
QUESTIONS = ["What's the weather in Paris?", "Is it sunny in Lima?", "How cold is it in Moscow?",
             "Tell me about Oslo.", "Weather for Rome, please."]


@pytest.fixture(scope="module")
def pair():
    return Tokenizer(MODELS / "target"), load_model(MODELS / "target"), load_model(MODELS / "draft")


def _requests(tokenizer: Tokenizer, temperature: float) -> tuple[list[list[int]], list[SamplingParams]]:
    """10 constrained requests: json_schema replies and forced calls (the opening in the prompt, as the gateway
    puts it there)."""
    stop = (tokenizer.token_to_id("<|im_end|>"),)
    ids = {m: tokenizer.token_to_id(m) for m in TOOL_MARKERS}
    prompts, params = [], []
    for i, question in enumerate(QUESTIONS * 2):
        forced = '<tool_call>\n{"name": "get_weather", "arguments": ' if i % 2 else ""
        grammar = (tool_call_grammar("hermes", {"get_weather": WEATHER}, "get_weather", True, ids) if i % 2
                   else json_grammar(ANSWER))
        text = tokenizer.render_chat([{"role": "user", "content": question}]) + forced
        prompts.append(tokenizer.encode(text))
        params.append(SamplingParams(temperature=temperature, seed=i, max_tokens=40, stop_token_ids=stop,
                                     grammar=grammar))
    return prompts, params


class Recorder:
    """A proposer that keeps what it was asked and what it proposed; `masked=False` hides the grammar from it."""

    def __init__(self, inner, masked: bool = True):
        self.inner, self.masked, self.name = inner, masked, inner.name
        self.drafts: list = []  # (committed output, grammar text, stop tokens, tree)

    def propose(self, inputs):
        if not self.masked:
            inputs = [dataclasses.replace(i, grammar=None) for i in inputs]
        trees = self.inner.propose(inputs)
        self.drafts += [(i.tokens[i.num_prompt_tokens:], i.params.grammar, i.params.stop_token_ids, t)
                        for i, t in zip(inputs, trees)]
        return trees

    def observe(self, verified):
        self.inner.observe(verified)

    def release(self, request_id):
        self.inner.release(request_id)


def _proposer(kind: str, draft) -> object:
    if kind == "recycle":
        return TokenRecyclingProposer(VOCAB)
    if kind == "suffix":
        return SuffixProposer(VOCAB)
    runner = ModelRunner(draft, num_blocks=512)
    return DraftModelProposer.chain(runner, length=4) if kind == "chain" else \
        DraftModelProposer(runner, max_depth=4, branch=3, width=3)


def _run(pair, proposer, temperature: float):
    tokenizer, target, _ = pair
    engine = SpecEngine(ModelRunner(target, num_blocks=1024), proposer, max_nodes=16 if proposer else 1,
                        adaptive=False)
    engine.constraints = Constraints(GrammarCompiler.from_dir(str(MODELS / "target"), VOCAB))
    requests = engine.add(*_requests(tokenizer, temperature))
    while engine.running:
        engine.step()
    return requests


def _forbidden_nodes(drafts) -> tuple[int, int]:
    """(nodes, nodes the target's grammar mask forbids under their parent), over every recorded tree."""
    compiler = GrammarCompiler.from_dir(str(MODELS / "target"), VOCAB)
    nodes = forbidden = 0
    for output, grammar, stop, tree in drafts:
        constraint = compiler.start(grammar, stop)  # a fresh matcher: the state the target masks with
        constraint.commit(output)
        rows = constraint.tree_allowed(tree.tokens, tree.parents)
        for node in range(1, tree.num_nodes):
            nodes += 1
            forbidden += not bool(rows[tree.parents[node], tree.tokens[node]])
    return nodes, forbidden


@pytest.fixture(scope="module")
def plain(pair):
    """Constrained greedy decoding without speculation: what every speculative run must output."""
    return [r.output for r in _run(pair, None, 0.0)]


@pytest.mark.parametrize(("kind", "temperature"), [("tree", 0.0), ("tree", 1.0), ("chain", 1.0), ("recycle", 0.0),
                                                   ("recycle", 1.0), ("suffix", 0.0)])
def test_every_proposer_drafts_only_nodes_the_grammar_allows(pair, plain, kind, temperature):
    recorder = Recorder(_proposer(kind, pair[2]))
    requests = _run(pair, recorder, temperature)
    nodes, forbidden = _forbidden_nodes(recorder.drafts)
    assert nodes > 0, "nothing was drafted: the check would be empty"
    assert forbidden == 0, f"{forbidden} of {nodes} draft nodes break the grammar"
    if temperature == 0.0:  # and the output is what plain constrained decoding gives
        assert [r.output for r in requests] == plain


def test_masking_the_draft_keeps_greedy_output_and_its_acceptance_is_printed(pair, plain):
    masked, unmasked = Recorder(_proposer("tree", pair[2])), Recorder(_proposer("tree", pair[2]), masked=False)
    with_mask, without_mask = _run(pair, masked, 0.0), _run(pair, unmasked, 0.0)
    assert [r.output for r in with_mask] == [r.output for r in without_mask] == plain
    accepted = [sum(r.stats.accepted_tokens for r in rs) for rs in (with_mask, without_mask)]
    steps = [sum(r.stats.steps for r in rs) for rs in (with_mask, without_mask)]
    print(f"\nconstrained greedy, draft-model tree on the pair: accepted tokens per step {accepted[0] / steps[0]:.2f}"
          f" with the draft masked, {accepted[1] / steps[1]:.2f} unmasked ({accepted[0]} vs {accepted[1]} accepted "
          f"in {steps[0]} vs {steps[1]} steps); draft nodes breaking the grammar: "
          f"{_forbidden_nodes(masked.drafts)[1]} vs {_forbidden_nodes(unmasked.drafts)[1]}")


def test_the_drafter_service_replays_the_output_to_mask_its_proposals(pair, plain):
    """Behind the bus the drafter knows a request by its DraftItem only: the grammar (in the sampling spec) and
    where the output starts in its tokens."""
    tokenizer, _, draft = pair
    grammars = DraftGrammars(GrammarCompiler.from_dir(str(MODELS / "target"), VOCAB))
    drafter = Drafter(DraftModelProposer(ModelRunner(draft, num_blocks=256), max_depth=4, branch=3, width=3),
                      grammars)
    prompts, params = _requests(tokenizer, 0.0)
    for step, (prompt, p, output) in enumerate(zip(prompts, params, plain)):
        spec = SamplingSpec(max_tokens=40, stop_token_ids=list(p.stop_token_ids), grammar=p.grammar)
        for cut in (1, 5, 9):  # the request at three points of its output, drafted in turn
            tokens = prompt + output[:cut]
            reply = drafter.draft(DraftBatch(step, "", [DraftItem(f"r{step}", tokens, spec, 12, len(prompt))]))
            tree = reply.trees[0]
            nodes, forbidden = _forbidden_nodes([(output[:cut], p.grammar, p.stop_token_ids, _tree(tree))])
            assert nodes > 0 and forbidden == 0, (step, cut, tree.tokens)
    unconstrained = DraftItem("free", prompts[0], SamplingSpec(max_tokens=40), 12, len(prompts[0]))
    assert grammars.state(unconstrained) is None and len(drafter.draft(DraftBatch(99, "", [unconstrained])).trees) == 1


def _tree(msg):
    from specrelay.shared.draft_tree import DraftTree

    return DraftTree(msg.tokens, msg.parents, msg.draft_probs, None if msg.q is None else torch.zeros(1))
