"""Fused LM-head + divergence + boundary, one file per role (as Cut Cross-Entropy splits its op):

- ``api.py``: the public functions and their documentation; routes a call to one of the paths below.
- ``checks.py``: ``DivergenceOptions`` (the options that are not per-row data, and the one place
  their defaults live), every input and option validated, turned into a ``Call``.
- ``passes.py``: the chunk pass over row chunks of a logit source (hidden states + LM heads, or
  logits in memory) and the scratch budget that sizes the chunks.
- ``rows.py``: the row math of one chunk, by the Triton row kernel or in plain PyTorch.
- ``kernels.py``: the Triton kernels.
- ``autograd.py``: the autograd Function shared by both logit sources.

The ground truth is ``motab_kernels.reference`` (naive, independent of all of the above).

``fused_linear_divergence`` computes, for every row i, a divergence between the teacher's and the
student's next-token distributions from the two models' final hidden states and LM heads, without
ever holding ``[N, V]`` logits, probabilities or gradients. Rows are processed in chunks: the two
logit GEMMs of a chunk run on cuBLAS into a bounded ``[chunk, V]`` fp32 buffer, one Triton kernel
per chunk reads it row by row (online log-sum-exp, divergence, monitoring statistics and, when a
gradient is needed, the gradient w.r.t. the student logits), and two more GEMMs multiply that
gradient straight into ``d hidden`` and an fp32 ``d weight`` accumulator. Nothing is recomputed in
backward: with a reduced loss, the gradients are formed during forward and backward only scales
them by the incoming scalar (benchmarks/NOTES.md has the cost model behind this choice).
Forward-only calls (monitoring) take the same buffered pass. A fused kernel that skips the buffer
(logit tiles formed with tensor-core dots and reduced in registers) measured 2× slower than the
buffered pass on an H200; it is kept for measurement in ``benchmarks/fused_monitor.py``, not here.
``logit_divergence`` runs the same pass over logits already in memory.

Math per row (s, t: transformed student / teacher logits, q = softmax(s), p = softmax(t)):

- ``fkl``  KL(p‖q) = Σ p·(log p − log q);        d/ds = q − p
- ``rkl``  KL(q‖p) = Σ q·(log q − log p);        d/ds = q·(log q − log p − KL(q‖p))
- ``jsd``  β·KL(p‖M) + (1−β)·KL(q‖M), M = β·p + (1−β)·q (TRL's generalized JSD);
           d/ds = (1−β)·q·(log q − log M − KL(q‖M)); β=0 is ``fkl`` and β=1 is ``rkl``, as in TRL.
"""

from motab_kernels.divergence.api import DivergenceOutput, first_stray_index, fused_linear_divergence, logit_divergence

__all__ = ["DivergenceOutput", "first_stray_index", "fused_linear_divergence", "logit_divergence"]
