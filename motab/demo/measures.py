"""Two measurements of the demo on a warm-started student: teacher decay (the teacher's accuracy
when it continues from the student's first L tokens) and teacher guidance (once the student has
written a wrong value, does the teacher follow the student's context, the problem, or neither)."""

from __future__ import annotations

import itertools

import torch

from motab.demo.toy_models import MAX_SOLUTION_TOKENS, greedy_solutions
from motab.evaluate import generate
from motab.toy.task import is_correct, operand_checks


def teacher_decay(student, teacher, tokenizer, problems, lengths=(0, 4, 8, 16, 24)) -> dict[int, float]:
    """Teacher accuracy when it continues (greedily) from the student's first L greedy tokens."""
    prompts, student_text = greedy_solutions(student, tokenizer, problems, batch_size=len(problems))
    accuracy = {}
    for length in lengths:
        prefixed = [prompt + tokens[:length] for prompt, tokens in zip(prompts, student_text)]
        continued = generate(teacher, tokenizer, prefixed, max_new_tokens=MAX_SOLUTION_TOKENS, batch_size=len(prompts))
        texts = [tokenizer.decode(s[:length] + c) for s, c in zip(student_text, continued)]
        accuracy[length] = sum(is_correct(text, p) for text, p in zip(texts, problems)) / len(problems)
    return accuracy


def teacher_guidance(student, teacher, tokenizer, problems) -> dict[str, int]:
    """What the teacher would write at the operands of the student's greedy solutions once the
    student has written a wrong one.

    ``first_wrong``: solutions with a wrong operand; ``teacher_right_at_first``: of those, where the
    teacher (greedy, given the student's context) would have written the right value. At every later
    operand whose value in the student's context differs from the problem's, the teacher's choice is
    ``consistent`` (it follows the student's context), ``true`` (the problem's value) or ``other``.
    Guidance that leaves the context ("other") is the reversed exposure bias MOTAB cuts away.
    """
    prompts, solutions = greedy_solutions(student, tokenizer, problems, batch_size=len(problems))
    counts = dict(first_wrong=0, teacher_right_at_first=0, consistent=0, true=0, other=0)
    device = next(teacher.parameters()).device
    for problem, prompt, tokens in zip(problems, prompts, solutions):
        pieces = [tokenizer.decode([t]) for t in tokens]
        token_at = {start: i for i, start in enumerate(itertools.accumulate([0] + [len(x) for x in pieces]))}
        checks = operand_checks(problem, "".join(pieces))
        first = next((i for i, c in enumerate(checks) if c.written != c.consistent), None)
        if first is None:
            continue
        with torch.no_grad():
            # the teacher's greedy choice for each completion token, given everything before it
            choice = teacher(torch.tensor([prompt + tokens], device=device)).logits[0, len(prompt) - 1 :].argmax(-1)
        teacher_digits = [tokenizer.decode([int(choice[token_at[c.position]])]) for c in checks]
        counts["first_wrong"] += 1
        counts["teacher_right_at_first"] += teacher_digits[first] == str(checks[first].consistent)
        for check, digit in zip(checks[first + 1 :], teacher_digits[first + 1 :]):
            if check.consistent != check.true:
                follows = {str(check.consistent): "consistent", str(check.true): "true"}
                counts[follows.get(digit, "other")] += 1
    return counts
