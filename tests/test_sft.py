"""The SFT stage (motab.sft) on a tiny Qwen2 with a word tokenizer: completion-only labels with and
without packing, no attention across packed documents, learning, exact resume, and clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from motab.models import load_tokenizer
from motab.sft import SFTOptions, build_trainer, run_sft, sft_config, to_dataset
from tests.tiny import tiny_qwen2, word_tokenizer

PROMPT_WORDS = [f"q{i}" for i in range(10)]
ANSWER_WORDS = [f"a{i}" for i in range(10)]
WORDS = ["<unk>", "</s>", *PROMPT_WORDS, *ANSWER_WORDS]
EOS = 1
PROMPT_IDS = {WORDS.index(w) for w in PROMPT_WORDS}
ANSWER_IDS = {WORDS.index(w) for w in ANSWER_WORDS} | {EOS}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from several threads, and OpenMP threads competing with other
    processes for a small machine's cores slow every step down a hundredfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokenizer():
    return word_tokenizer(WORDS, "<unk>", eos_token="</s>")


def model(seed: int = 0, **config):
    return tiny_qwen2(seed, vocab=len(WORDS), **config)


def records(n: int = 8) -> list[dict]:
    """Prompts of q-words, completions (of 1 to 3 words, so that rows need padding) of a-words, plus
    the synthesis step's other fields, which training must ignore."""
    out = []
    for i in range(n):
        prompt = f"q{i} q{(i + 1) % 10} q{(i + 3) % 10}"
        completion = " " + " ".join(f"a{(i * 3 + k) % 10}" for k in range(i % 3 + 1))
        out.append({"prompt": prompt, "completion": completion, "input": prompt, "output": "q0 " * 5, "score": i})
    return out


def options(**overrides) -> SFTOptions:
    """Quick runs: a few steps, small rows, fp32 (deterministic), checkpoints only where asked."""
    base = dict(max_steps=4, max_length=64, learning_rate=3e-3, bf16=False, save_steps=1000, logging_steps=1)
    return SFTOptions(**{**base, **overrides})


def write_jsonl(path, rows, *, blank_after: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def completion_loglik(lm, tok, rows) -> float:
    """Mean log-likelihood per completion token (EOS included) given the prompt, by a plain forward."""
    lm.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tok(row["prompt"])["input_ids"]
            ids = tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
            logp = torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), -1)
            for t in range(len(prompt), len(ids)):
                total += logp[t - 1, ids[t]].item()
                count += 1
    return total / count


def batches(trainer):
    return list(trainer.get_train_dataloader())


@pytest.mark.parametrize("packing", [True, False])
def test_prompt_tokens_get_no_loss(tmp_path, packing):
    trainer = build_trainer(
        model(), records(), tmp_path, options(packing=packing, per_device_train_batch_size=3), tokenizer=tokenizer()
    )
    columns = set(trainer.train_dataset.column_names)
    assert {"input_ids", "labels"} <= columns and not {"input", "output", "score"} & columns
    labelled, documents = 0, 0
    for batch in batches(trainer):
        ids, labels = batch["input_ids"], batch["labels"]
        if packing:  # padding-free: one row, documents delimited by position_ids, no attention mask
            assert "attention_mask" not in batch and ids.shape[0] == 1
            real = torch.ones_like(ids, dtype=torch.bool)
            documents += int((batch["position_ids"] == 0).sum())
        else:
            real = batch["attention_mask"].bool()
            assert not real.all(), "rows of different lengths should be padded"
            documents += ids.shape[0]
        for token, label, keep in zip(ids.flatten().tolist(), labels.flatten().tolist(), real.flatten().tolist()):
            if not keep:
                assert label == -100, "padding must carry no loss"
            elif token in PROMPT_IDS:
                assert label == -100, "a prompt token carries loss"
            else:
                assert token in ANSWER_IDS and label == token, "a completion token (or its EOS) lost its label"
                labelled += 1
    assert documents == len(records())
    assert labelled == sum(len(r["completion"].split()) + 1 for r in records())  # every completion + its EOS


@pytest.mark.parametrize("packing", [True, False])
def test_trainer_loss_is_the_completion_nll(tmp_path, packing):
    """The loss TRL optimises equals a direct cross-entropy over the completion positions only."""
    trainer = build_trainer(model(), records(), tmp_path, options(packing=packing), tokenizer=tokenizer())
    batch = batches(trainer)[0]
    lm = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(lm, dict(batch)).item()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        logits = lm(**inputs).logits[0, :-1].float()
        targets = batch["input_ids"][0, 1:]
        completion = torch.tensor([t in ANSWER_IDS for t in targets.tolist()])
        if "attention_mask" in batch:
            completion &= batch["attention_mask"][0, 1:].bool()
        if "position_ids" in batch:  # a document's first token is not predicted from the previous document
            completion &= batch["position_ids"][0, 1:] != 0
        nll = torch.nn.functional.cross_entropy(logits[completion], targets[completion]).item()
        everything = torch.nn.functional.cross_entropy(logits, targets).item()
    assert loss == pytest.approx(nll, rel=1e-4, abs=1e-5)
    assert abs(loss - everything) > 1e-3  # the check can tell the two apart


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(tmp_path, attention):
    """On CPU with sdpa/eager, the packed row (position_ids, no attention mask) gives each document the
    logits it gets alone: transformers builds a block-diagonal mask from the position_ids."""
    lm = model()
    lm.set_attn_implementation(attention)
    trainer = build_trainer(lm, records(), tmp_path, options(packing=True), tokenizer=tokenizer())
    batch = batches(trainer)[0]
    lm = trainer.model.eval()
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) > 2, "the row should pack several documents"
    with torch.no_grad():
        packed = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        for begin, end in zip(starts, starts[1:]):
            alone = lm(input_ids=batch["input_ids"][:, begin:end]).logits[0]
            torch.testing.assert_close(packed[begin:end], alone, rtol=1e-4, atol=1e-5)


def test_training_raises_completion_likelihood_and_saves(tmp_path, capsys):
    tok, lm = tokenizer(), model()
    rows = records()
    before = completion_loglik(lm, tok, rows)
    result = run_sft(lm, rows, tmp_path / "out", options(max_steps=12, progress=False), tokenizer=tok)
    assert result.global_step == 12 and result.resumed_from is None
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 0.5
    shown = capsys.readouterr()
    assert "'loss'" not in shown.out and "Writing model shards" not in shown.err  # no progress: no log dict, no bar
    after = completion_loglik(result.trainer.model, tok, rows)
    assert after > before + 0.5
    # the final model and tokenizer are in output_dir and load back from disk alone
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    tok2 = load_tokenizer(tmp_path / "out")
    assert tok2("q1 a2")["input_ids"] == tok("q1 a2")["input_ids"]
    assert tok2.pad_token == "</s>"
    assert completion_loglik(reloaded, tok2, rows) == pytest.approx(after, abs=1e-4)


def test_resume_continues_to_the_uninterrupted_result(tmp_path):
    """A run interrupted after its step-2 checkpoint, resumed, ends on the uninterrupted run's weights
    (steps 3-6 cross an epoch boundary, so the data order is replayed too). The resumed run is handed
    another model: only loading the checkpoint's weights can land it there. Models come from
    directories, as in the pipeline."""
    base, other = tmp_path / "base", tmp_path / "other"
    for seed, folder in ((0, base), (1, other)):
        model(seed).save_pretrained(folder)
        tokenizer().save_pretrained(folder)
    data = write_jsonl(tmp_path / "sft.jsonl", records())
    opts = options(max_steps=6, save_steps=2, save_total_limit=None, packing=False, per_device_train_batch_size=2)

    full = run_sft(str(base), data, tmp_path / "full", opts)
    assert full.global_step == 6
    assert full.trainer.processing_class("q1 a2")["input_ids"] == tokenizer()("q1 a2")["input_ids"]
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", interrupted / "checkpoint-2")

    resumed = run_sft(other, data, interrupted, opts, resume=True)
    assert resumed.resumed_from == interrupted / "checkpoint-2"
    assert resumed.global_step == 6
    losses = {e["step"]: e["loss"] for e in full.trainer.state.log_history if "loss" in e}
    resumed_losses = {e["step"]: e["loss"] for e in resumed.trainer.state.log_history if "loss" in e}
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]  # 1-2 from the checkpoint's history, 3-6 trained now
    assert resumed_losses == pytest.approx(losses, abs=1e-5)
    expected = full.trainer.model.state_dict()
    for name, value in resumed.trainer.model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # the saved final model is the resumed one
    reloaded = AutoModelForCausalLM.from_pretrained(interrupted, local_files_only=True).state_dict()
    torch.testing.assert_close(reloaded, expected)


def test_defaults_follow_the_reference_scripts(tmp_path):
    o = SFTOptions()
    assert (o.learning_rate, o.num_train_epochs, o.min_lr, o.warmup_ratio) == (5e-5, 6, 1e-6, 0.05)
    assert (o.weight_decay, o.adam_beta2, o.packing, o.max_length) == (0.1, 0.95, True, 32768)
    assert (o.per_device_train_batch_size, o.gradient_accumulation_steps, o.seed, o.max_steps) == (1, 1, 0, None)
    config = sft_config(o, tmp_path)
    assert config.completion_only_loss is True and config.packing is True and config.max_length == 32768
    assert config.bf16 == torch.cuda.is_available()
    assert config.adam_beta2 == 0.95 and config.weight_decay == 0.1 and config.num_train_epochs == 6
    # the schedule: 5% linear warm-up, then cosine down to min_lr
    trainer = build_trainer(model(), records(), tmp_path, dataclasses.replace(o, bf16=False), tokenizer=tokenizer())
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    # ceil(0.05 * 100) = 5 warm-up steps from 0, then the peak
    assert lrs[:6] == pytest.approx([0, 1e-5, 2e-5, 3e-5, 4e-5, 5e-5]) and max(lrs) == pytest.approx(5e-5)
    assert lrs[-1] == pytest.approx(1e-6, rel=0.05) and min(lrs[5:]) >= 1e-6 * (1 - 1e-9)


def test_only_prompt_and_completion_are_kept():
    data = to_dataset(records(3))
    assert data.column_names == ["prompt", "completion"] and len(data) == 3


def test_bad_records_are_refused_with_their_line(tmp_path):
    rows = records(3)
    del rows[1]["completion"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows, blank_after=1)  # the bad record is on line 3
    with pytest.raises(ValueError, match=r"bad\.jsonl:3 lacks \['completion'\]"):
        run_sft(model(), path, tmp_path / "out", options(), tokenizer=tokenizer())
    rows = records(2)
    rows[1]["prompt"] = 7
    with pytest.raises(ValueError, match=r"record 1: \['prompt'\] must be strings"):
        to_dataset(rows)
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no SFT records"):
        run_sft(model(), tmp_path / "empty.jsonl", tmp_path / "out", options(), tokenizer=tokenizer())
    with pytest.raises(FileNotFoundError):
        to_dataset(tmp_path / "missing.jsonl")


def test_output_dir_and_resume_are_checked(tmp_path):
    used = tmp_path / "used"
    (used / "checkpoint-3").mkdir(parents=True)
    with pytest.raises(ValueError, match="already holds checkpoints.*checkpoint-3.*resume=True.*overwrite=True"):
        run_sft(model(), records(), used, options(), tokenizer=tokenizer())
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="already holds a saved model: pass overwrite=True"):
        run_sft(model(), records(), saved, options(), tokenizer=tokenizer())
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(ValueError, match="holds no checkpoint"):
            run_sft(model(), records(), folder, options(), tokenizer=tokenizer(), resume=True)


def test_model_and_tokenizer_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="loads models from disk only"):
        run_sft(str(tmp_path / "no-such-model"), records(), tmp_path / "out", options())
    with pytest.raises(ValueError, match="pass the tokenizer"):
        run_sft(model(), records(), tmp_path / "out", options())
    with pytest.raises(ValueError, match="no eos_token"):
        run_sft(model(), records(), tmp_path / "out", options(), tokenizer=word_tokenizer(WORDS, "<unk>"))


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 0.0),
        ("learning_rate", "5e-5"),
        ("num_train_epochs", 0),
        ("min_lr", 1.0),
        ("warmup_ratio", 1.5),
        ("adam_beta2", 1.0),
        ("weight_decay", -0.1),
        ("max_length", None),
        ("max_length", 0),
        ("per_device_train_batch_size", 0),
        ("gradient_accumulation_steps", 1.5),
        ("save_steps", 0),
        ("save_total_limit", 0),
        ("max_steps", 0),
        ("logging_steps", 0),
        ("seed", -1),
        ("bf16", "yes"),
        ("packing", 1),
    ],
)
def test_options_are_validated(field, value):
    with pytest.raises(ValueError, match=f"SFTOptions.{field} "):
        SFTOptions(**{field: value})
