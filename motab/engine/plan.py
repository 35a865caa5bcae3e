"""Plan before load: what a run's paged engine would hold, from the models' config.json alone.

``plan`` counts each model's parameters on the meta device (no weight is read or allocated),
its KV bytes per token in the run's dtype, and the pool the run would get: ``kv_tokens`` when set;
else, on a GPU, ``kv_memory`` of the memory left after the weights, shared by the models' pools
by their bytes per token (as ``motab.engine.api.pool_tokens`` sizes it once the weights are in);
on a CPU every row's whole budget. Then how many rows fit in flight at the whole budget and at
shorter lengths (reasoning traces are mostly far shorter than their budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from motab.config import RolloutConfig
from motab.engine.api import CPU_POOL_ROWS
from motab.engine.schedule import memory_pool_tokens, tokens_per_row, whole_budget_tokens
from motab.models import kv_bytes_per_token

GIB = 1024**3


@dataclass(frozen=True)
class ModelPlan:
    role: str
    source: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelPlan, ...]
    device: str  # in words
    memory_bytes: int | None  # the device's memory the plan starts from (None: a CPU)
    pool_tokens: int  # each model's pool
    pool_from: str  # how the pool was sized, in words
    row_tokens: int  # a row's whole budget: prompt, response, a draft and a correction past it
    rows: int | None  # the run's cap on rows in flight (None: as many as fit)

    def rows_at(self, tokens: int) -> int:
        """Rows of ``tokens`` each that the pool holds at once (at most the run's cap)."""
        fit = self.pool_tokens // tokens
        return fit if self.rows is None else min(self.rows, fit)

    def table(self, prompt_tokens: int, budget: int) -> str:
        """The plan in words, as ``--plan`` prints it."""
        lines = [f"plan for {self.device} (from config.json; no weights loaded)"]
        lines.append(f"  {'model':<9}{'parameters':>14}{'weights':>12}{'KV a token':>13}  source")
        for m in self.models:
            lines.append(
                f"  {m.role:<9}{m.parameters / 1e9:>12.2f} B{m.weight_bytes / GIB:>8.1f} GiB"
                f"{m.kv_bytes_per_token / 1024:>9.0f} KiB  {m.source}"
            )
        both = sum(m.kv_bytes_per_token for m in self.models)
        lines.append(
            f"  KV pool: {self.pool_tokens:,} tokens in each model's pool ({self.pool_from}; "
            f"{self.pool_tokens * both / GIB:.1f} GiB for {len(self.models)} model(s), {both / 1024:.0f} KiB a token)"
        )
        cap = "none: as many as fit" if self.rows is None else self.rows
        lines.append(f"  rows in flight (the run's cap: {cap}):")
        for share in (1.0, 0.5, 0.25):
            response = int(budget * share)
            tokens = min(self.row_tokens, prompt_tokens + response + (self.row_tokens - prompt_tokens - budget))
            label = "the whole budget" if share == 1.0 else f"{share:.0%} of the budget"
            fit = self.rows_at(tokens)
            lines.append(f"    {fit:>6} at {tokens:,} tokens a row ({label}: {response:,} response tokens)")
        return "\n".join(lines)


def model_plan(role: str, source: str, model_config, dtype: torch.dtype) -> ModelPlan:
    """One model's parameters (counted on the meta device), weights and KV a token in ``dtype``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    parameters = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    size = torch.empty((), dtype=dtype).element_size()
    return ModelPlan(role, source, parameters, parameters * size, kv_bytes_per_token(model_config, size))


def plan(
    models: list[ModelPlan],
    config: RolloutConfig,
    *,
    prompt_tokens: int,
    rows: int | None,
    device: str,
    memory_bytes: int | None,
) -> Plan:
    """The pool and rows a run would get: ``memory_bytes`` of free device memory before loading
    (None: a CPU, the whole budget of ``rows`` rows, or of ``CPU_POOL_ROWS`` uncapped, unless
    ``config.kv_tokens``); ``rows``: the run's cap on rows in flight (None: as many as fit)."""
    row_tokens = tokens_per_row(prompt_tokens, config)
    if config.kv_tokens:
        pool, source = config.kv_tokens, "--kv-tokens"
    elif memory_bytes is None:
        counted = rows or CPU_POOL_ROWS
        pool, source = whole_budget_tokens(counted, prompt_tokens, config), f"the whole budget of {counted} rows: a CPU"
    else:
        left = memory_bytes - sum(m.weight_bytes for m in models)
        if left <= 0:
            raise ValueError(
                f"the weights ({sum(m.weight_bytes for m in models) / GIB:.1f} GiB) do not fit the device's "
                f"{memory_bytes / GIB:.1f} GiB"
            )
        per_token = sum(m.kv_bytes_per_token for m in models)
        pool = memory_pool_tokens(left, per_token, config)
        if rows is not None:  # never more than the rows in flight can use
            pool = min(pool, whole_budget_tokens(rows, prompt_tokens, config))
        source = f"{config.kv_memory:g} of the {left / GIB:.1f} GiB left after the weights"
    return Plan(tuple(models), device, memory_bytes, pool, source, row_tokens, rows)
