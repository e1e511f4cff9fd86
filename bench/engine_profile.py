"""Where an engine step's time goes, by wall timers put around its parts for the profiled steps only, and the
verify cost curve. Each part is timed exclusively (a matmul inside attention would count once, as a matmul):

    attention   llama.write_kv and llama.attention: the KV write, the block gather and the attention itself
    matmuls     every nn.Linear of the model (q/k/v, o, gate/up, down, the LM head)
    other_model the rest of the model's forward: embedding, norms, RoPE, residual adds
    sampling    the engine's acceptance (argmax, or the lossless rejection rule for drafts)
    bookkeeping the rest of the step: batch building, block tables, commit, Python between them
"""

from __future__ import annotations

import time
from collections import defaultdict

PARTS = ("attention", "matmuls", "other_model", "sampling", "bookkeeping")


class StepProfile:
    """`with StepProfile(engine) as p: p.step()`: steps with the timers in; `mean()` per step, in seconds."""

    def __init__(self, engine):
        import torch

        from specrelay.shared.modeling import llama

        self.engine, self.llama = engine, llama
        self.model = engine.runner.model
        self.linears = [m for m in self.model.modules() if isinstance(m, torch.nn.Linear)]
        self.seconds: dict[str, float] = defaultdict(float)
        self.num_steps = 0
        self._stack: list[float] = []  # time spent in nested timed parts, per open part

    def _timed(self, part: str, fn):
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - t0
                inner = self._stack.pop()
                self.seconds[part] += elapsed - inner
                if self._stack:
                    self._stack[-1] += elapsed
        return timed

    def __enter__(self) -> StepProfile:
        self._attention = {name: getattr(self.llama, name) for name in ("write_kv", "attention")}
        for name, fn in self._attention.items():
            setattr(self.llama, name, self._timed("attention", fn))
        for m in self.linears:
            m.forward = self._timed("matmuls", m.forward)
        self.model.forward_hidden = self._timed("other_model", self.model.forward_hidden)
        if hasattr(self.engine, "_accept"):
            self.engine._accept = self._timed("sampling", self.engine._accept)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._attention.items():
            setattr(self.llama, name, fn)
        for m in self.linears:
            del m.forward  # the instance attribute goes; the class's method shows through again
        del self.model.forward_hidden
        self.engine.__dict__.pop("_accept", None)

    def step(self) -> None:
        run = self._timed("bookkeeping", self.engine.step)
        run()
        self.num_steps += 1

    def mean(self) -> dict[str, float]:
        return {part: self.seconds[part] / max(self.num_steps, 1) for part in PARTS}


def verify_curve(model, context: list[int], max_m: int, repeats: int = 3) -> dict:
    """t_verify(m) / t_verify(1) for m = 1 .. max_m: one causal forward of m new tokens (all rows' logits, as a
    verification wants them) after `context`, the fastest of `repeats` (on a shared machine the slower ones
    measure the neighbours), the new tokens rolled back after each; one unmeasured forward first warms up."""
    from specrelay.shared.modeling.kv_cache import BlockTable
    from specrelay.shared.modeling.runner import ModelRunner, StepInput

    runner = ModelRunner(model, num_blocks=(len(context) + max_m) // 16 + 2)
    table = BlockTable()
    runner.prefill(table, context[:-1])
    runner.forward([StepInput(table, context[-1:])])
    runner.cache.truncate(table, len(context) - 1)
    seconds = []
    for m in range(1, max_m + 1):
        new = (context * (m // len(context) + 1))[-m:]
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner.forward([StepInput(table, new, logits_rows=list(range(m)))])
            times.append(time.perf_counter() - t0)
            runner.cache.truncate(table, len(context) - 1)
        seconds.append(min(times))
    return {"context": len(context) - 1, "m": list(range(1, max_m + 1)), "t1_ms": round(1e3 * seconds[0], 2),
            "ratio": [round(s / seconds[0], 3) for s in seconds]}
