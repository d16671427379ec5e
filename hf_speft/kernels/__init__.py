"""The strategies behind `hf_speft.ops` (its one public front): each computes the three products of a sparse delta
Δ given by a `SparsePattern` and its values — the forward correction x·Δᵀ, the input gradient g·Δ and the values'
gradient (gᵀ·x at the mask, an SDDMM) — and `choice` picks one per product and shape bucket by timing them.

`csr`: torch's CSR kernels (half precision runs in float32). `dense`: native-dtype GEMMs with a scatter/gather at the
mask. `triton`: Triton kernels reading fp16/bf16 directly and accumulating in float32 (needs the `triton` extra).
"""

KERNELS = ("auto", "csr", "dense", "triton")
