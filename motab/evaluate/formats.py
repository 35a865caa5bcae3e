"""Answer formats: how a completion's final answer is read and graded.

A format (``AnswerFormat``) has an ``extract`` (the answer it reads, shown in the results) and an
``is_correct`` (its verdict against the reference). Formats are looked up by name in a registry:
``math`` (math-verify) and ``choice`` (a multiple-choice letter) are built in; a front end
registers its own (the demo registers ``toy``, the toy task's ``#d``), so this module knows no task.

Thinking models write their reasoning inside ``<think>…</think>`` first: every format grades what
follows the last ``</think>`` (``answer_part``); a completion still inside its thought when it
stopped (it, or its prompt, opened ``<think>`` and never closed it) has no answer.

math-verify times its parsing and comparison out with ``signal.alarm``, which works only in a
process's main thread: there it runs as it is; from any other thread ``is_correct`` hands the
grading to a worker process (in whose main thread the alarm works) and waits for its verdict.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# math-verify's own limits, in seconds, on parsing one text and on comparing two answers (its defaults).
PARSE_SECONDS = 5
VERIFY_SECONDS = 5
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please reason step by step, and put the letter of your final answer within \\boxed{}."

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


@dataclass(frozen=True)
class AnswerFormat:
    """How the answers of a benchmark are read and graded.

    ``extract(text)``: the final answer of the text after the thought, or None if it gives none.
    ``is_correct(text, reference)``: whether it answers the reference (None: the extracted answer
    equals the stripped reference). ``instruction``: what a chat prompt adds after the question
    (``--prompt-format chat``), empty for none."""

    name: str
    extract: Callable[[str], str | None]
    is_correct: Callable[[str, str], bool] | None = None
    description: str = ""
    instruction: str = ""

    def grade(self, completion: str, reference: str, *, thought_open: bool = False) -> tuple[str | None, bool]:
        """(extracted answer, correct) of one completion; ``thought_open``: its prompt opened
        ``<think>``, so without a ``</think>`` the completion never left its thought."""
        text = answer_part(completion, thought_open=thought_open)
        if text is None:
            return None, False
        extracted = self.extract(text)
        if self.is_correct is None:
            return extracted, extracted is not None and extracted == reference.strip()
        return extracted, bool(self.is_correct(text, reference))


def answer_part(completion: str, *, thought_open: bool = False) -> str | None:
    """What follows the completion's last ``</think>``; the whole completion if it never thought;
    None if it stopped inside its thought (it, or its prompt, opened one and never closed it)."""
    head, closed, tail = completion.rpartition(THINK_CLOSE)
    if closed:
        return tail
    return None if thought_open or THINK_OPEN in completion else completion


def opens_thought(prompt: str) -> bool:
    """Whether a prompt's text leaves a ``<think>`` open (templates that start the thought for the model)."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


_FORMATS: dict[str, AnswerFormat] = {}


def register_answer_format(answer_format: AnswerFormat, *, replace: bool = False) -> AnswerFormat:
    """Makes ``answer_format`` known by its name (``evaluate(..., answer_format=name)``, ``motab eval
    --answer-format``) and returns it. Registering the same format again changes nothing; another
    format under a name already taken is refused unless ``replace``."""
    if not isinstance(answer_format, AnswerFormat):
        raise TypeError(f"expected an AnswerFormat, got {type(answer_format).__name__}")
    held = _FORMATS.get(answer_format.name)
    if held is not None and held != answer_format and not replace:
        raise ValueError(f"answer format {answer_format.name!r} is already registered (pass replace=True)")
    _FORMATS[answer_format.name] = answer_format
    return answer_format


def answer_formats() -> tuple[str, ...]:
    """The names of the registered answer formats, in order of registration."""
    return tuple(_FORMATS)


def get_answer_format(answer_format: str | AnswerFormat) -> AnswerFormat:
    """The registered format of that name (a format passed as a value is returned as it is)."""
    if isinstance(answer_format, AnswerFormat):
        return answer_format
    found = _FORMATS.get(answer_format)
    if found is None:
        known = ", ".join(repr(name) for name in _FORMATS)
        hint = " ('boxed' is now 'math', graded by math-verify)" if answer_format == "boxed" else ""
        raise ValueError(
            f"unknown answer format {answer_format!r}; registered: {known}{hint} "
            "(a front end adds its own with motab.evaluate.register_answer_format)"
        )
    return found


def extract_answer(completion: str, answer_format: str | AnswerFormat = "math") -> str | None:
    """The final answer of a completion in a registered format (after its thought, if any)."""
    text = answer_part(completion)
    return None if text is None else get_answer_format(answer_format).extract(text)


def is_correct(completion: str, reference: str, answer_format: str | AnswerFormat = "math") -> bool:
    """Whether ``completion`` answers ``reference`` in ``answer_format`` (``math``: math-verify's
    verdict, the reference parsed first; ``choice``: the same option letter; or a registered
    format). Text up to the last ``</think>`` is left out; an unclosed thought has no answer."""
    return get_answer_format(answer_format).grade(completion, reference)[1]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces kept."""
    starts = [m.end() for m in _BOX.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


# --- math: math-verify ---------------------------------------------------------------------------


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@functools.lru_cache(maxsize=1024)
def _parsed_reference(reference: str) -> list:
    """math-verify's reading of a gold answer: boxed, so a bare ``\\frac{1}{2}`` or ``27`` parses as LaTeX."""
    from math_verify import parse

    text = reference if _BOX.search(reference) else f"\\boxed{{{reference}}}"
    return parse(text, parsing_timeout=PARSE_SECONDS)


@functools.lru_cache(maxsize=256)
def _parsed_completion(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=PARSE_SECONDS)


def _math_reading(text: str) -> str | None:
    """The answer math-verify reads in ``text`` (its last \\boxed{}, else its last expression)."""
    predicted = _parsed_completion(text)
    return str(predicted[-1]) if predicted else None


def _math_verdict(text: str, reference: str) -> bool:
    """math-verify's verdict: the reference parsed first, then the text, then compared."""
    from math_verify import verify

    gold = _parsed_reference(reference)
    predicted = _parsed_completion(text)
    return bool(gold and predicted and verify(gold, predicted, timeout_seconds=VERIFY_SECONDS))


_WORKER = None
_WORKER_LOCK = threading.Lock()


def _with_alarms(function, *args):
    """``function(*args)`` where math-verify's ``signal.alarm`` timeouts work: here in the main
    thread, else in a worker process's main thread."""
    if _in_main_thread():
        return function(*args)
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # forkserver: forking a process that runs threads (torch's, the caller's) can deadlock the child
            _WORKER = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("forkserver"))
        worker = _WORKER
    return worker.submit(function, *args).result()


def _math_extract(text: str) -> str | None:
    return _with_alarms(_math_reading, text)


def _math_is_correct(text: str, reference: str) -> bool:
    return _with_alarms(_math_verdict, text, reference)


MATH = register_answer_format(
    AnswerFormat(
        "math",
        _math_extract,
        _math_is_correct,
        description="math-verify: the last \\boxed{} (else the last expression) equal to the reference in value",
        instruction=MATH_INSTRUCTION,
    )
)


# --- choice: one option letter -------------------------------------------------------------------

_LETTER_IN_BOX = re.compile(r"^\s*(?:\\text\s*\{\s*)?\(?\s*([A-Z])\s*\)?\s*\}?\s*(?:[.:)]|\s|$)")
_LETTER_STATED = re.compile(
    r"(?:answer|option|choice)\s*(?:is|:)?\s*(?:option\s*)?[:\s]*\**\(?\s*([A-Z])\s*\)?\**(?![A-Za-z])",
    re.IGNORECASE,
)


def extract_choice(text: str) -> str | None:
    """The option letter a completion settles on: its last ``\\boxed{}`` (``C``, ``(C)``,
    ``\\text{C}``), else its last "answer is (C)" / "Answer: C"."""
    boxed = extract_boxed(text)
    if boxed is not None:
        found = _LETTER_IN_BOX.match(boxed)
        if found:
            return found.group(1)
    stated = [m.group(1) for m in _LETTER_STATED.finditer(text) if m.group(1).isupper()]
    return stated[-1] if stated else None


CHOICE = register_answer_format(
    AnswerFormat(
        "choice",
        extract_choice,
        description="multiple choice: the option letter of the last \\boxed{} or of 'answer is (C)'",
        instruction=CHOICE_INSTRUCTION,
    )
)
