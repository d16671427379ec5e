"""DeepSpeed ZeRO-3: reading weights that ZeRO-3 has partitioned across ranks.

Under ZeRO-3 a parameter's `.data` is an empty placeholder except inside DeepSpeed's module hooks or a
`deepspeed.zero.GatheredParameters` block. Salience reads weights outside the engine's hooks (it runs before the engine
is built, so the mask's size is fixed when DeepSpeed partitions the adapter), so it gathers them here. DeepSpeed is
imported only when a partitioned parameter is present.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from .compat import is_partitioned


@contextlib.contextmanager
def gathered(parameters: Iterable[torch.Tensor]) -> Iterator[None]:
    """Inside the block, the ZeRO-3 partitioned `parameters` hold their full data on every rank (read-only: changes are
    not written back); a no-op for plain parameters."""
    parameters = [parameter for parameter in parameters if is_partitioned(parameter)]
    if not parameters:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
        yield

