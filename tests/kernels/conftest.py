"""Every kernel test runs the Triton kernels under the interpreter (TRITON_INTERPRET=1).

triton decides at import whether its own library functions (tl.zeros, tl.sum, ...) are interpreted, so triton is
imported here with the variable set; the variable itself is then restored, and each test sets it again through
monkeypatch, so that other packages' tests in the same pytest process keep the plain torch path.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from specrelay.shared.draft_tree import DraftTree

if "triton" not in sys.modules:
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    tl = pytest.importorskip("triton.language")
    from triton.runtime.interpreter import InterpretedFunction

    from specrelay.kernels.dispatch import set_kernel_mode

    if not isinstance(tl.zeros, InterpretedFunction):
        pytest.fail("triton was imported before tests/kernels/conftest.py could turn its interpreter on; "
                    "run these tests in their own process: pytest tests/kernels")  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("SPECRELAY_KERNELS", raising=False)
    set_kernel_mode(None)
    yield
    set_kernel_mode(None)


def ancestor_mask(parents: list[int]) -> torch.Tensor:  # [n, n] bool
    """mask[i, j] = node j is node i or one of its ancestors: the engine's own DraftTree mask."""
    return DraftTree([0] * len(parents), parents, [1.0] * len(parents)).ancestor_mask()


def random_parents(n: int, gen: torch.Generator, max_depth: int | None = None) -> list[int]:
    """A random tree of n nodes in topological order (node 0 the root)."""
    parents, depth = [-1], [0]
    for i in range(1, n):
        while True:
            p = int(torch.randint(i, (1,), generator=gen))
            if max_depth is None or depth[p] < max_depth:
                break
        parents.append(p)
        depth.append(depth[p] + 1)
    return parents
