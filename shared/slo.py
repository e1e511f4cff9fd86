"""SLO classes and the `--slo` spec: one language for the gateway's `--schedule slo` and the load generator.

A spec is `[CLASS:]key=value[,key=value...]`; keys are `ttft`, `tpot`, `e2e`; a value is a number with an optional
unit (`ms`, the default as in vLLM's `--goodput`, or `s`). A spec without a class applies to every class; one with a
class overrides only that class. `--slo` may repeat: `--slo ttft=2s --slo interactive:ttft=500ms,tpot=50`.

The classes are the gateway's (body `slo_class` / header `X-SLO-Class`), after JITServe's request kinds:
`interactive` (latency-sensitive streaming: TTFT and per-token latency), `deadline` (the whole response by a
deadline: E2E), `batch` (no latency target; it only has to finish).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from specrelay.shared.errors import SpecrelayError

SLO_CLASSES = ("interactive", "deadline", "batch")
SLO_KEYS = ("ttft", "tpot", "e2e")

_VALUE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s)?\s*$")


class SloSpecError(SpecrelayError):
    """A `--slo` value that cannot be parsed."""


@dataclass(frozen=True)
class Slo:
    """Latency targets of one request, in milliseconds; None = no target on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft", self.ttft_ms), ("tpot", self.tpot_ms), ("e2e", self.e2e_ms)) if v is not None}


# Defaults sized for the embedded CPU/GPU pair; every sweep and report prints the targets it used.
DEFAULT_SLOS: dict[str, Slo] = {
    "interactive": Slo(ttft_ms=1000.0, tpot_ms=100.0),
    "deadline": Slo(e2e_ms=30_000.0),
    "batch": Slo(),
}


def parse_duration_ms(text: str, *, what: str) -> float:
    m = _VALUE.match(text)
    if m is None:
        raise SloSpecError(f"{what}: {text!r} is not a duration (use e.g. 250, 250ms or 2.5s)")
    value = float(m.group(1)) * (1000.0 if m.group(2) == "s" else 1.0)
    if value <= 0:
        raise SloSpecError(f"{what}: a target must be positive, got {text!r}")
    return value


def parse_slo_specs(specs: list[str] | None, base: dict[str, Slo] | None = None) -> dict[str, Slo]:
    """Apply `--slo` specs in order over `base` (the defaults) and return the per-class targets."""
    result = dict(DEFAULT_SLOS if base is None else base)
    for spec in specs or []:
        text = spec.strip()
        if not text:
            raise SloSpecError("empty --slo spec (expected e.g. ttft=500ms,tpot=50ms,e2e=20s)")
        classes: tuple[str, ...] = SLO_CLASSES
        head, sep, rest = text.partition(":")
        if sep and "=" not in head:
            cls = head.strip()
            if cls not in SLO_CLASSES:
                raise SloSpecError(f"--slo {spec!r}: unknown class {cls!r} (one of {', '.join(SLO_CLASSES)})")
            classes, text = (cls,), rest
        updates: dict[str, float] = {}
        for item in text.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            if not eq:
                raise SloSpecError(f"--slo {spec!r}: {item.strip()!r} is not key=value (keys: {', '.join(SLO_KEYS)})")
            if key not in SLO_KEYS:
                raise SloSpecError(f"--slo {spec!r}: unknown key {key!r} (keys: {', '.join(SLO_KEYS)})")
            if key in updates:
                raise SloSpecError(f"--slo {spec!r}: {key} given twice")
            updates[key] = parse_duration_ms(value, what=f"--slo {key}")
        fields = {f"{k}_ms": v for k, v in updates.items()}
        for cls in classes:
            result[cls] = replace(result[cls], **fields)
    return result


def format_slos(slos: dict[str, Slo]) -> str:
    parts = []
    for cls in SLO_CLASSES:
        targets = ",".join(f"{k}={v:g}ms" for k, v in slos[cls].as_dict().items()) or "none"
        parts.append(f"{cls}:{targets}")
    return " ".join(parts)
