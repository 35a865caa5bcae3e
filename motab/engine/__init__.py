"""The MOTAB rollout engine: the student drafts, the teacher verifies in one forward, the fused op
scores every drafted token, and a row that strayed is cut back in place and corrected by the
teacher before the student goes on. The baselines are modes of the same engine (``motab.policy``:
each mode is a policy the engine reads), so comparisons are fair.

Alignment invariant (as in speculative decoding): for every row both caches hold the committed
tokens but the last, which is *pending* (committed, not yet fed). The student drafts by feeding
the pending token and its own draft one at a time; the teacher reads ``[pending, d1 … d(k−1)]``
in one forward, which gives its distribution for each drafted token.

By role, data flowing one way (nano-vllm's engine/ and vLLM v1's core in spirit):

- ``api``: the entry points (``rollout``, ``rollout_in_batches``, ``paged_for_rollouts``): settle
  the settings, size or check the caches, pick the driver;
- ``rows``: a ``Row`` (the only owner of its committed state: ``commit`` and ``cut``) and the
  ``CutQueue`` that takes every cache truncation of a round to the caches in one call per model;
- ``schedule``: the round loop and its ``Scheduler`` (continuous batching over cache slots, pages
  on demand, preemption by recompute); ``plan``: the KV plan from config.json alone;
- ``rounds``: the paged primitives both drivers share (a row's entry and exit, draft, verify,
  score, the teacher's decode, extend and catch-up, stops, timing phases);
- ``token`` and ``step``: the two drivers — each drafted token against its row's boundary (the
  online modes), or each finished step's oracle value against its entropy boundary with a rewind
  to the TD-error root cause (the paper's modes);
- ``sampling``: counter-based per-row sampling; ``trajectory``: what a rollout returns.
"""

from motab.engine.api import (
    DEFAULT_ROLLOUT,
    check_same_tokenizer,
    paged_for_rollouts,
    pool_tokens,
    rollout,
    rollout_in_batches,
)
from motab.engine.sampling import sample_tokens
from motab.engine.trajectory import Trajectory

__all__ = [
    "DEFAULT_ROLLOUT",
    "Trajectory",
    "check_same_tokenizer",
    "paged_for_rollouts",
    "pool_tokens",
    "rollout",
    "rollout_in_batches",
    "sample_tokens",
]
