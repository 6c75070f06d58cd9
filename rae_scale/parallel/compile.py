"""Optional torch.compile of each transformer block (after AC, before FSDP).

Compiling block by block (not the whole model) keeps compile time bounded by one block's graph, lets
identical blocks reuse the same compiled code, and leaves FSDP's per-block hooks outside the graph.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn


def apply_compile(blocks: Iterable[nn.Module], **compile_kwargs) -> None:
    """Compile each block in place with `nn.Module.compile` (keeps parameter names unchanged)."""
    for block in blocks:
        # fullgraph stays False (the default): a graph break in a helper costs speed, not correctness
        block.compile(**compile_kwargs)
