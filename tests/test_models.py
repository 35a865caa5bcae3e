"""PagedModel on tiny random HF models (built from configs; nothing is downloaded).

Each equality test also proves the paged path ran (attention calls counted, free blocks moved),
so a silent fallback to HF's own attention cannot pass it. The models use initializer_range 0.4
(varied greedy outputs; asserted) and no EOS.
"""

from __future__ import annotations

import copy

import pytest
import torch

from motab.models import PagedModel, greedy_decode
from motab.tiny import tiny_config, tiny_model
from motab_kernels.paged_kv import OutOfBlocksError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COMMON = dict(
    vocab=101, hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, max_positions=256, initializer_range=0.4
)
FAMILIES = {
    "llama": lambda: tiny_config("llama", **COMMON),
    "qwen2": lambda: tiny_config("qwen2", **COMMON, tie=False),
    "qwen2-tied": lambda: tiny_config("qwen2", **COMMON, tie=True),
    "qwen3": lambda: tiny_config("qwen3", **COMMON, head_dim=32),
    "mistral-window": lambda: tiny_config("mistral", **COMMON, sliding_window=6),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62], [99]]


def make_model(family, seed=0, attention="sdpa"):
    model = tiny_model(seed, FAMILIES[family](), attn_implementation=attention).to(DEVICE).eval()
    model.generation_config.eos_token_id = None
    return model


def paged(model, impl, **kw):
    options = dict(max_rows=6, max_tokens=256, block_size=4, attention_impl=impl)
    return PagedModel(model, **{**options, **kw})


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt], device=DEVICE), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_extend_matches_hf_forward_at_every_position(family, impl):
    model = make_model(family)
    expected = [model.model(torch.tensor([p], device=DEVICE)).last_hidden_state[0] for p in PROMPTS]
    pm = paged(model, impl)
    hidden = pm.extend([3, 0, 5, 1], PROMPTS)  # rows in any order
    assert pm.paged_attention_calls == model.config.num_hidden_layers
    assert pm.cache.num_free_blocks < pm.cache.num_blocks
    torch.testing.assert_close(hidden, torch.cat(expected), rtol=1e-4, atol=1e-4)
    # a second, ragged extend continues each row at its own position
    more = [[7, 8, 9], [1], [], [2, 3]]
    hidden = pm.extend([3, 0, 5, 1], more)
    expected = [
        model.model(torch.tensor([p + m], device=DEVICE)).last_hidden_state[0, len(p) :] for p, m in zip(PROMPTS, more)
    ]
    torch.testing.assert_close(hidden, torch.cat(expected), rtol=1e-4, atol=1e-4)
    assert pm.lengths([3, 0, 5, 1]) == [len(p) + len(m) for p, m in zip(PROMPTS, more)]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("family", ["llama", "qwen2-tied", "mistral-window"])
def test_greedy_decoding_matches_hf_generate(family, impl):
    model = make_model(family, seed=1)
    expected = [hf_greedy(model, p, 12) for p in PROMPTS]
    pm = paged(model, impl)
    for pool in pm.cache.key_cache + pm.cache.value_cache:  # every slot is written before it is read
        pool.fill_(float("nan"))
    calls_before = pm.paged_attention_calls
    got = greedy_decode(pm, PROMPTS, 12)
    assert pm.paged_attention_calls - calls_before == 12 * model.config.num_hidden_layers
    assert all(len(set(tokens)) >= 5 for tokens in expected), "degenerate outputs hide cache bugs"
    assert got == expected


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_truncate_then_decode_equals_fresh_run(impl):
    model = make_model("qwen2", seed=2)
    pm = paged(model, impl)
    rows = [0, 1, 2]
    prompts = PROMPTS[:3]
    continuation = greedy_decode(pm, prompts, 8)  # caches: prompt + 7 tokens; the 8th is pending
    # backtrack row 1 alone to its prompt + 3 generated tokens, then all rows go on in one batch
    keep = len(prompts[1]) + 3
    free_before = pm.cache.num_free_blocks
    pm.truncate([1], [keep])
    assert pm.cache.num_free_blocks > free_before
    feed = [[continuation[0][-1]], [continuation[1][3]], [continuation[2][-1]]]
    hidden = pm.extend(rows, feed)
    for i, row in enumerate(rows):
        history = prompts[row] + (continuation[row][:3] if row == 1 else continuation[row][:-1]) + feed[i]
        fresh = model.model(torch.tensor([history], device=DEVICE)).last_hidden_state[0, -1]
        torch.testing.assert_close(hidden[i], fresh, rtol=1e-4, atol=1e-4)
    assert pm.lengths(rows) == [len(prompts[0]) + 8, keep + 1, len(prompts[2]) + 8]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_same_model_still_trains_and_generates(attention):
    """Without paged state the registered function falls back to the model's own attention, with
    the masks the original implementation would build (padding included)."""
    model = make_model("llama", seed=3, attention=attention)
    original = copy.deepcopy(model)
    paged(model, "torch")
    assert model.config._attn_implementation == "motab_paged_" + attention
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], device=DEVICE)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], device=DEVICE)
    for m in (model, original):
        m.train()
        loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
    torch.testing.assert_close(
        model(input_ids=ids, attention_mask=mask, labels=ids).loss,
        original(input_ids=ids, attention_mask=mask, labels=ids).loss,
    )
    for p, q in zip(model.parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    model.eval()
    original.eval()
    assert hf_greedy(model, PROMPTS[0], 6) == hf_greedy(original, PROMPTS[0], 6)


def test_errors_leave_the_cache_as_it_was():
    model = make_model("qwen3")
    pm = paged(model, "torch", max_tokens=16, max_rows=3)  # 4 + 3 blocks of 4
    pm.extend([0], [list(range(20))])
    state = (pm.cache.block_table.clone(), pm.cache.seq_lens.clone(), pm.cache.num_free_blocks, pm.lengths())
    with pytest.raises(OutOfBlocksError, match="exhausted"):
        pm.extend([1, 2], [list(range(6)), list(range(7))])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 101\)"):
        pm.extend([1], [[5, 101]])
    with pytest.raises(ValueError, match="2 rows but 1 token sequences"):
        pm.extend([1, 2], [[5]])
    after = (pm.cache.block_table, pm.cache.seq_lens, pm.cache.num_free_blocks, pm.lengths())
    assert torch.equal(state[0], after[0]) and torch.equal(state[1], after[1]) and state[2:] == after[2:]
