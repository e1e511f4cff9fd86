"""What SpecEngine does for preemption (services/verifier/preempted.py): take a running request out of the batch
and put it back, with its KV as it was or recomputed. A mixin over the engine's `running`, `paused`, `runner` and
`num_prefilled_tokens`, so that engine.py stays one idea long."""

from __future__ import annotations

import logging
from typing import Any

from specrelay.services.verifier.handoffs import PausedOutput, RequestOutput, StepPlan, StepResult

log = logging.getLogger(__name__)


class Pausing:
    running: list[Any]
    paused: dict[str, Any]
    runner: Any
    num_prefilled_tokens: int

    def execute_pauses(self, plan: StepPlan, result: StepResult) -> None:
        """The plan's pauses, then its resumes (a recompute that fails fails its request alone)."""
        for name in plan.paused:
            if (req := self.pause(name)) is not None:
                result.paused[name] = PausedOutput(req, len(req.tokens), len(req.table.blocks))
        for unpause in plan.unpaused:
            try:
                self.unpause(unpause.request_id)
            except Exception as e:  # noqa: BLE001 - the others go on
                log.exception("engine: resuming %s failed", unpause.request_id)
                self.runner.release(unpause.kv.table)
                result.outputs.append(RequestOutput(unpause.request_id, finish_reason="error",
                                                    error=f"the verifier could not resume this request: {e}"))

    def pause(self, name: str) -> Any | None:
        """Take a running request out of the batch (preemption); its KV stays in its table until released."""
        req = next((r for r in self.running if r.name == name), None)
        if req is not None:
            self.running.remove(req)
            self.paused[name] = req
        return req

    def unpause(self, name: str) -> Any:
        """Put a paused request back in the batch. Its cache must again hold every committed token but the last:
        what a release took (all of it, or all but a prefix loaded back from the kvstore) is prefilled again, and
        its logits are not needed — the last committed token is the next step's root, as it was when paused. The
        request keeps its generator, so a seeded sampling stream goes on where it stopped."""
        req = self.paused.pop(name)
        fed = len(req.tokens) - 1
        if req.table.num_tokens < fed:
            self.num_prefilled_tokens += fed - req.table.num_tokens
            self.runner.prefill(req.table, req.tokens[req.table.num_tokens : fed])
        self.running.append(req)
        return req
