"""Where specrelay keeps what it computes once per machine: imported models (models/resolve.py), PTE profiles
(shared/pte_profiles.py), relay profiles. `SPECRELAY_CACHE_DIR`, default ~/.cache/specrelay; the tests point it at a
temporary directory so that they neither read nor write the user's."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SPECRELAY_CACHE_DIR") or Path.home() / ".cache" / "specrelay")
