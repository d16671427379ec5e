"""torchrun worker for tests/test_kernels.py: each rank's own disk cache names a different forward strategy for the
same bucket; rank 0's decision must reach every rank."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

out_dir = Path(sys.argv[1])
dist.init_process_group("gloo")
rank = dist.get_rank()
os.environ["HF_SPEFT_KERNEL_CACHE"] = str(out_dir / f"cache{rank}.json")

from hf_speft.kernels import choice  # noqa: E402
from hf_speft.ops import SparsePattern, kernel_choices, sparse_delta  # noqa: E402

torch.manual_seed(0)
pattern = SparsePattern(torch.randperm(6 * 5)[:7].sort().values, 6, 5)
x, values = torch.randn(4 + rank, 5), torch.randn(7)  # token counts differ between ranks
key = choice.bucket("forward", x.device, x.dtype, (6, 5), 7, x.shape[0])
Path(choice.cache_path()).write_text(json.dumps({f"{key} [{choice._versions()}]": ["csr", "dense"][rank]}))
out = sparse_delta(torch.zeros(x.shape[0], 6), x, values, pattern)
reference = x @ pattern.delta(values).to_dense().t()
torch.testing.assert_close(out, reference)
(out_dir / f"choices{rank}.json").write_text(json.dumps({"world_size": dist.get_world_size(),
                                                          "choices": kernel_choices()}))
dist.destroy_process_group()
