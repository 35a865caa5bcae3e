"""One LM-head contract (``motab.models.lm_head`` / ``shared_vocab``) through rollout, training and
the drop-ins, with tiny models whose heads are padded past the tokenizer as real families' are
(Qwen2.5-7B / 1.5B: 152,064 / 151,936 rows for 151,665 tokens), an untied Llama-3-style pair, and a
head with a bias. The reference is the models' own full logits cut to the tokenizer's ids."""

from __future__ import annotations

import pytest
import torch

from motab.config import MonitorConfig, RolloutConfig, TrainConfig
from motab.data import Problem
from motab.engine import rollout
from motab.integrations.hf import DistillationTrainer as HFDistillationTrainer
from motab.integrations.hf import distillation_loss
from motab.models import PagedModel, lm_head, shared_vocab
from motab.tiny import tiny_model
from motab.trainer import DistillationTrainer
from motab_kernels.reference import per_token_divergence
from tests.tiny import tiny_qwen2, word_tokenizer

TOKENS = 60  # the tokenizer's vocabulary; every head below has more rows
TOKENIZER = word_tokenizer([f"w{i}" for i in range(TOKENS - 2)] + ["<pad>", "<eos>"], "w0", eos_token="<eos>")


def qwen_pair():
    """Heads padded differently, as Qwen2.5-1.5B's (student) and 7B's (teacher) are."""
    return tiny_qwen2(0, hidden=32, layers=1, vocab=64).eval(), tiny_qwen2(1, hidden=64, layers=2, vocab=72).eval()


def llama(seed, vocab, hidden):
    return tiny_model(seed, family="llama", vocab=vocab, hidden=hidden, initializer_range=0.2).eval()


def with_head_bias(model, seed):
    """The model with an LM head that has a bias (random, so that dropping it would show)."""
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.copy_(torch.randn(head.out_features, generator=torch.Generator().manual_seed(seed)))
    model.set_output_embeddings(biased)
    model.config.tie_word_embeddings = False
    return model


PAIRS = {
    "qwen-padded": qwen_pair,
    "llama-untied": lambda: (llama(0, 66, 32), llama(1, 70, 64)),
    "head-bias": lambda: (with_head_bias(tiny_qwen2(0, hidden=32, layers=1, vocab=64).eval(), 0), qwen_pair()[1]),
}


def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TOKENS - 2, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_the_drop_in_loss_is_the_divergence_over_the_tokenizers_ids(pair):
    student, teacher = PAIRS[pair]()
    inputs = batch()
    out = distillation_loss(student, teacher, inputs, kind="fkl", vocab_size=TOKENS)
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"]).logits[:, :-1, :TOKENS].double()
        t = teacher(input_ids=inputs["input_ids"]).logits[:, :-1, :TOKENS].double()
    valid = inputs["labels"][:, 1:] != -100
    expected = per_token_divergence(s[valid], t[valid], "fkl", 0.5).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="vocabulary mismatch: the student's LM head has"):
        distillation_loss(student, teacher, inputs)  # the heads differ: the shared ids must be named


def test_the_head_bias_is_never_dropped():
    student = with_head_bias(tiny_qwen2(0, hidden=32, layers=1, vocab=64).eval(), 0)
    weight, bias = lm_head(student, TOKENS)
    assert weight.shape == (TOKENS, 32) and bias is not None and bias.shape == (TOKENS,)
    assert torch.equal(bias, student.get_output_embeddings().bias[:TOKENS])
    paged = PagedModel(student, max_rows=1, max_tokens=32)
    hidden = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(paged.logits(hidden, TOKENS), student.lm_head(hidden)[:, :TOKENS])


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_rollout_and_a_training_step_over_padded_heads(pair, tmp_path):
    student, teacher = PAIRS[pair]()
    problems = [Problem(f"p{i}", [1 + i, 2 + i, 3 + i], "0", None) for i in range(4)]
    config = RolloutConfig(max_new_tokens=8, draft_len=4, monitor=MonitorConfig(rule="fixed", tau=0.5, warmup=1))
    trajectories = rollout(student, teacher, [p.prompt_ids for p in problems], config, tokenizer=TOKENIZER)
    assert all(0 <= t < TOKENS for traj in trajectories for t in traj.tokens)
    train = TrainConfig(output_dir=str(tmp_path), steps=1, prompts_per_step=4, micro_batch=2, rollout=config)
    run = DistillationTrainer(student, teacher, TOKENIZER, problems, train)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    run.train(progress=False)
    changed = [k for k, v in student.state_dict().items() if not torch.equal(before[k], v)]
    assert changed
    if pair == "head-bias":
        assert "lm_head.bias" in changed  # the bias is trained, not dropped


def test_a_tokenizer_that_does_not_fit_the_heads_is_refused_before_any_rollout(tmp_path):
    student, teacher = qwen_pair()
    big = word_tokenizer([f"w{i}" for i in range(70)], "w0", eos_token="w1")  # 70 ids, the student's head has 64
    problems = [Problem("p", [1, 2], "0", None)]
    with pytest.raises(ValueError, match="70 ids do not fit the LM heads"):
        DistillationTrainer(student, teacher, big, problems, TrainConfig(output_dir=str(tmp_path), steps=1))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        shared_vocab(student, teacher)


def test_the_hf_trainer_takes_the_shared_ids_from_its_tokenizer(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    student, teacher = qwen_pair()
    rows = batch()
    data = Dataset.from_dict({k: v.tolist() for k, v in rows.items()})
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    trainer = HFDistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        processing_class=TOKENIZER,
        data_collator=lambda b: {k: torch.tensor([r[k] for r in b]) for k in ("input_ids", "attention_mask", "labels")},
        kind="fkl",
    )
    assert trainer.train().global_step == 1


def test_paged_rows_may_be_tensors_on_any_device():
    student, _ = qwen_pair()
    paged = PagedModel(student, max_rows=2, max_tokens=64)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        rows = torch.tensor([1, 0], device=device)
        paged.reset()
        hidden = paged.extend(rows, [[1, 2, 3], [4, 5]])
        assert hidden.shape[0] == 5 and paged.lengths(rows) == [3, 2]
        paged.truncate(rows, [1, 1])
        assert paged.lengths([0, 1]) == [1, 1]
