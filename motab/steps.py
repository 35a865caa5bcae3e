"""The paper's step-level quantities, as its authors' reference scripts compute them.

A *step* is the text a writer produces up to the first occurrence of the stop string (".\n\n" by
default), its end of sequence, or the step budget. For each student step the scripts compute

- the **oracle value** V = exp(mean over the step's L tokens of log p_teacher(y_i | context, y_<i)),
  the teacher's geometric-mean probability of the step (``oracle_value``);
- the **adaptive boundary** ε = ε0 · exp(−θ · H), with H the entropy of the teacher's next-token
  distribution at the context before the step, restricted to its top k tokens and renormalised
  (``topk_entropy``, ``entropy_boundary``); and on the first breach (V < ε)
- the **TD-error root cause** t* = argmin over k ≥ 1 of δ_k = V_k − V_(k−1), among the k whose
  previous step was safe, ties to the lowest k; t* = 0 when the breach is at the first step
  (``root_cause``).

The scripts run on SGLang, which cuts the stop string off a step: the step loses it and the next
context is ``context + step + "\\n\\n"``. ``trim_at_stop`` finds that cut on the step's tokens;
the engine replays it when ``RolloutConfig.trim_stop`` is set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# What the scripts put between a trimmed step and the next one.
SCRIPT_SEPARATOR = "\n\n"
# Tokens of tail decoded to look for a stop string, beyond the string's length in characters:
# every token decodes to at least one character, a few more cover partial UTF-8 sequences.
_TAIL_SLACK = 4


def tail_width(stops: Sequence[str]) -> int:
    """Tokens of tail enough to hold the longest of ``stops`` and the newest token."""
    return max(len(s) for s in stops) + _TAIL_SLACK


def stop_tail(tokens: Sequence[int], new_tokens: Sequence[int], start: int, stops: Sequence[str]) -> list[int]:
    """The last tokens of ``tokens[start:] + new_tokens`` that a stop check reads, without copying
    the rest (a step or a response can be 32k tokens long, checked after every token)."""
    width = tail_width(stops)
    return (list(tokens[max(start, len(tokens) - width) :]) + list(new_tokens))[-width:]


def contains_stop_at_end(tokenizer, tokens: Sequence[int], stops: Sequence[str]) -> bool:
    """Whether the text of the last ``tail_width(stops)`` of ``tokens`` contains one of ``stops``.
    Called after every new token, it finds the first occurrence without ever decoding more than a
    short tail (a whole response at 32k tokens decoded after every token would be quadratic);
    callers pass a bounded tail for the same reason."""
    if not stops or not tokens:
        return False
    tail = tokenizer.decode(list(tokens[-tail_width(stops) :]))
    return any(stop in tail for stop in stops)


def trim_at_stop(tokenizer, tokens: Sequence[int], stop: str) -> tuple[int, str]:
    """How SGLang's stop-string cut lands on a step's ``tokens`` whose text contains ``stop``:
    ``(keep, rest)`` where ``tokens[:keep]`` is the longest token prefix whose text is a prefix of
    the text before the stop string, and ``rest`` the text the cut leaves of the next token (empty
    when the stop string starts on a token boundary, e.g. when it is a single token)."""
    text = tokenizer.decode(list(tokens))
    at = text.find(stop)
    if at < 0:
        raise ValueError(f"the step's text does not contain the stop string {stop!r}")
    trimmed = text[:at]
    keep = 0
    for n in range(len(tokens), -1, -1):
        if trimmed.startswith(tokenizer.decode(list(tokens[:n]))):
            keep = n
            break
    return keep, trimmed[len(tokenizer.decode(list(tokens[:keep]))) :]


def oracle_value(teacher_logprobs: Sequence[float]) -> float | None:
    """exp(mean log p_teacher) of a step's tokens; None for an empty step (nothing to score)."""
    if not teacher_logprobs:
        return None
    return math.exp(sum(teacher_logprobs) / len(teacher_logprobs))


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of ``logits`` [rows, V] (temperature 1): the entropy, in nats, of the distribution
    restricted to the row's top ``k`` entries and renormalised over them."""
    top = torch.topk(logits.float(), min(k, logits.shape[-1]), dim=-1).values
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy_boundary(entropy: float, epsilon0: float, theta: float) -> float:
    """ε = ε0 · exp(−θ · H): an uncertain teacher (high H) allows less likely steps."""
    return epsilon0 * math.exp(-theta * entropy)


def root_cause(values: Sequence[float | None], boundaries: Sequence[float]) -> int:
    """The step to rewind to once the last of ``values`` breached its boundary: argmin of
    δ_k = V_k − V_(k−1) over k ≥ 1 whose previous step was safe (ties to the lowest k); the step of
    least V when no k qualifies (a breach at the first step gives 0). Unscored (empty) steps count
    as safe with V = 1, the value of a step the teacher is certain of."""
    v = [1.0 if x is None else x for x in values]
    candidates = [k for k in range(1, len(v)) if v[k - 1] >= boundaries[k - 1]]
    if not candidates:
        return min(range(len(v)), key=lambda k: (v[k], k))
    return min(candidates, key=lambda k: (v[k] - v[k - 1], k))
