"""torchrun worker for tests/test_kernel_choice.py, run as `kernel_choice_worker.py OUT_DIR MODE`: two ranks train a
sparse delta under DDP with the automatic choice, and one rank meets something alone.

- MODE `failing`: every strategy `csr` product raises on rank 1 only, while rank 0's disk cache names `csr` for its
  buckets (so rank 0 uses it without measuring).
- MODE `alone`: after two steps rank 0 alone runs an evaluation forward with a new token count and a new shape, then
  both ranks meet at a barrier and train one more step.

Each rank writes OUT_DIR/rank{r}.json: world size, its decisions and the trained values. The process group times out
after 60 s, so a rank waiting for a collective the other never joins fails instead of hanging.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

out_dir, mode = Path(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
os.environ["HF_SPEFT_KERNEL_CACHE"] = str(out_dir / f"cache{rank}.json")

from hf_speft.kernels import choice, csr  # noqa: E402
from hf_speft.ops import SparsePattern, kernel_choices, sparse_delta  # noqa: E402

OUT, IN, NNZ = 6, 5, 7


class SparseLinear(torch.nn.Module):
    def __init__(self, out_features: int, in_features: int, nnz: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features).requires_grad_(False)
        self.pattern = SparsePattern(torch.randperm(out_features * in_features)[:nnz].sort().values,
                                     out_features, in_features)
        self.values = torch.nn.Parameter(torch.randn(nnz))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_delta(self.linear(x), x, self.values, self.pattern)


def broken(*args, **kwargs):
    raise RuntimeError("csr is broken on this rank")


torch.manual_seed(0)  # the same model on both ranks
model = SparseLinear(OUT, IN, NNZ)
tokens = 4 + rank  # the ranks' token counts differ (so do their buckets)
if mode == "failing":
    if rank == 1:
        csr.forward = csr.input_grad = csr.values_grad = broken
    else:
        keys = [choice.bucket(product, torch.device("cpu"), torch.float32, (OUT, IN), NNZ, tokens)
                for product in ("forward", "input_grad", "values_grad")]
        choice.cache_path().write_text(json.dumps({f"{key} [{choice._versions()}]": "csr" for key in keys}))

ddp = torch.nn.parallel.DistributedDataParallel(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data


def step() -> None:
    x = torch.randn(tokens, IN, generator=generator, requires_grad=True)
    ddp(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


step()
step()
if mode == "alone" and rank == 0:  # evaluation or generation on rank 0 only: a new bucket, and a new shape
    with torch.no_grad():
        model(torch.randn(33, IN))
        SparseLinear(7, 3, 4)(torch.randn(2, 3))
dist.barrier()
step()
(out_dir / f"rank{rank}.json").write_text(json.dumps({"world_size": dist.get_world_size(), "choices": kernel_choices(),
                                                      "values": model.values.detach().tolist()}))
dist.destroy_process_group()
