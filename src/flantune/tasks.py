"""Built-in text-to-text tasks: how one raw row of a public dataset becomes a (source, target) pair.

    build_task   a task name and the recipe's task_options → a Task (TaskError when either is wrong)
    Task.format  one raw row → an Example, None when the task leaves the row out by design, or a
                 RowError naming the column that does not fit the schema

Each task is one formatter function `(row, options) -> Example | None` and one line in TASKS with
its defaults and metadata. Every formatter reads its columns through the same few helpers (_text,
_int, _str_list, ...), so every task rejects a bad row the same way, with the same words.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

# The metrics flantune.metrics computes (it imports this list). Held here, so that building a task
# does not import rouge_score and sacrebleu.
METRIC_NAMES = (
    "rouge",
    "bleu",
    "chrf",
    "exact_match",
    "f1",
    "accuracy",
    "macro_f1",
    "mc_accuracy",
    "format_rate",
)


class TaskError(ValueError):
    """A task name or task option in the recipe is wrong."""

    def __init__(self, key: str, message: str):
        # Both parts go to Exception.__init__ so the error survives pickling (worker processes).
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class RowError(ValueError):
    """One raw row does not fit the task's schema."""

    def __init__(self, column: str, problem: str):
        super().__init__(column, problem)
        self.column = column
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.column}: {self.problem}"


@dataclass(frozen=True)
class Example:
    source: str
    target: str
    references: tuple[str, ...] = ()
    """Every acceptable target (SQuAD has several answers), target first. Empty means (target,)."""
    choices: tuple[str, ...] = ()
    """Multiple choice: the options in the order the source shows them (A, B, C, D)."""


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    """One line, shown by `flantune tasks`."""
    columns: tuple[str, ...]
    """The columns a row must have."""
    metrics: tuple[str, ...]
    """Names from METRIC_NAMES."""
    labels: tuple[str, ...] | None
    """Classification: the exact target strings; else None."""
    answer_prefix: str | None
    """A prefix every target starts with (e.g. "german: "), stripped before scoring; else None."""
    options: Mapping[str, Any]
    """The resolved options: the task's defaults overridden by the recipe."""
    multiple_choice: bool = False
    """The source shows options and a prediction is scored by the option it names (`Example.choices`)."""

    def format(self, row: Mapping[str, Any]) -> Example | None:
        """The example for one raw row; None when the task leaves the row out by design."""
        return TASKS[self.name].formatter(row, self.options)


# ----------------------------------------------------------------------------------------------
# Row validation: every formatter reads its columns through these, so a missing column, a null, a
# wrong type or an empty text is reported the same way by every task.


def _value(row: Mapping[str, Any], column: str) -> Any:
    if column not in row:
        raise RowError(column, "missing column")
    if row[column] is None:
        raise RowError(column, "is null")
    return row[column]


def _as_text(value: Any, column: str, where: str = "", allow_empty: bool = False) -> str:
    """`value` as stripped text. `where` names a part of the column ("text[0]", "key 'de'")."""
    at = f"{where}: " if where else ""
    if value is None:
        raise RowError(column, f"{at}is null")
    if not isinstance(value, str):
        raise RowError(column, f"{at}expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(column, f"{at}is empty")
    return value.strip()


def _text(row: Mapping[str, Any], column: str, allow_empty: bool = False) -> str:
    """A non-empty string column, stripped. allow_empty: "" is a valid value (e.g. SciQ's support)."""
    return _as_text(_value(row, column), column, allow_empty=allow_empty)


def _int(row: Mapping[str, Any], column: str, allowed: Sequence[int]) -> int:
    value = _value(row, column)
    # bool is a subclass of int: without this check a True/False label would pass as 1/0 unnoticed.
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowError(
            column, f"expected an int, one of {_listing(allowed)}; got {type(value).__name__} {value!r}"
        )
    if value not in allowed:
        raise RowError(column, f"expected one of {_listing(allowed)}, got {value}")
    return value


def _as_str_list(value: Any, column: str, where: str = "") -> list[str]:
    """A list of strings, each stripped (possibly empty: callers decide whether that is allowed)."""
    at = f"{where}: " if where else ""
    if not isinstance(value, list | tuple):
        raise RowError(column, f"{at}expected a list of strings, got {type(value).__name__}")
    return [
        _as_text(item, column, f"{where}[{i}]" if where else f"item {i}", allow_empty=True)
        for i, item in enumerate(value)
    ]


def _str_list(row: Mapping[str, Any], column: str) -> list[str]:
    return _as_str_list(_value(row, column), column)


def _key(row: Mapping[str, Any], column: str, key: str) -> Any:
    """`row[column][key]` for a column that holds an object (SQuAD's answers, WMT's translation)."""
    value = _value(row, column)
    if not isinstance(value, Mapping):
        raise RowError(column, f"expected an object with key {key!r}, got {type(value).__name__}")
    if key not in value:
        raise RowError(column, f"missing key {key!r}")
    return value[key]


def _listing(values: Sequence[Any]) -> str:
    return ", ".join(str(v) for v in values)


# ----------------------------------------------------------------------------------------------
# The tasks, one formatter each


# All 24 orders of four options; a row picks one by a stable hash of its question.
_PERMUTATIONS = tuple(itertools.permutations(range(4)))
# A sentence ends at . ! or ? followed by whitespace: simple, and right for SciQ's support texts.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sciq_parts(row: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, str, tuple[str, ...], str]:
    """SciQ's source, correct answer, shown options and support text."""
    question = _text(row, "question")
    answer = _text(row, "correct_answer")
    distractors = [_text(row, f"distractor{i}") for i in (1, 2, 3)]
    support = _text(row, "support", allow_empty=True)  # ~11% of SciQ rows have no support
    # The correct answer comes first in the data; shuffle so its position teaches nothing. The order
    # comes from sha256, not hash() (salted per process), so every process and every run agree.
    digest = hashlib.sha256(f"{options['seed']}\n{question}".encode()).digest()
    order = _PERMUTATIONS[int.from_bytes(digest[:8], "big") % len(_PERMUTATIONS)]
    choices = tuple([answer, *distractors][i] for i in order)
    shown = " ".join(f"({letter}) {choice}" for letter, choice in zip("ABCD", choices, strict=True))
    source = f"question: {question} options: {shown}"
    if options["include_support"] and support:
        source += f" context: {support}"
    return source, answer, choices, support


def _sciq(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    source, answer, choices, _ = _sciq_parts(row, options)
    return Example(source, answer, choices=choices)


def _sciq_think(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    source, answer, choices, support = _sciq_parts(row, options)
    # One line of reasoning the model can learn to write: the support sentence that holds the
    # answer, else the support's first sentence, else a plain statement when there is no support.
    sentences = [s for s in _SENTENCE_END.split(support) if s.strip()]
    with_answer = [s for s in sentences if answer.lower() in s.lower()]
    rationale = (with_answer or sentences or [f"The answer is {answer}."])[0]
    rationale = " ".join(rationale.split())  # the whole target stays on one line
    return Example(source, f"<think> {rationale} </think> <answer> {answer} </answer>", choices=choices)


def _squad_answers(row: Mapping[str, Any]) -> list[str]:
    """SQuAD's answers.text: at least one answer, none empty, duplicates dropped (order kept)."""
    texts = _as_str_list(_key(row, "answers", "text"), "answers", "text")
    if not texts:
        raise RowError("answers", "text: no answer (expected at least one)")
    for i, text in enumerate(texts):
        if not text:
            raise RowError("answers", f"text[{i}]: is empty")
    return list(dict.fromkeys(texts))


def _squad_qa(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    question, context = _text(row, "question"), _text(row, "context")
    answers = _squad_answers(row)
    return Example(f"question: {question} context: {context}", answers[0], references=tuple(answers))


def _squad_qg(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    question, context = _text(row, "question"), _text(row, "context")
    answer = _squad_answers(row)[0]
    return Example(f"generate question: answer: {answer} context: {context}", question)


def _samsum(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    return Example(f"summarize: {_text(row, 'dialogue')}", _text(row, "summary"))


_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _imdb_sentiment(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    # IMDB reviews keep the site's HTML line breaks; they are noise to a tokenizer.
    text = re.sub(r" {2,}", " ", _HTML_BREAK.sub(" ", _text(row, "text"))).strip()
    if not text:
        raise RowError("text", "is empty once its HTML line breaks are removed")
    label = _int(row, "label", (0, 1))
    return Example(f"sentiment analysis: {text}", "sentiment: True" if label == 1 else "sentiment: False")


EMOTIONS = ("sadness", "joy", "love", "anger", "fear", "surprise")  # dair-ai/emotion's label ids 0..5


def _emotion(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    text = _text(row, "text")
    # The hub gives label ids; exported files sometimes hold the names instead. Accept both.
    label = row.get("label")
    if isinstance(label, str):
        if label.strip() not in EMOTIONS:
            raise RowError("label", f"expected one of {_listing(EMOTIONS)} or an id 0..5, got {label!r}")
        name = label.strip()
    else:
        name = EMOTIONS[_int(row, "label", range(len(EMOTIONS)))]
    return Example(f"emotion classification: {text}", name)


def _paws_paraphrase(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example | None:
    sentence1, sentence2 = _text(row, "sentence1"), _text(row, "sentence2")
    # Only true paraphrases teach paraphrasing; label-0 pairs mean something else by design.
    if _int(row, "label", (0, 1)) == 0:
        return None
    return Example(f"paraphrase: {sentence1}", sentence2)


def _paws_similarity(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    sentence1, sentence2 = _text(row, "sentence1"), _text(row, "sentence2")
    label = _int(row, "label", (0, 1))
    source = f"paraphrase detection: sentence1: {sentence1} sentence2: {sentence2}"
    return Example(source, "yes" if label == 1 else "no")


def _wmt16_en_de(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    english = _as_text(_key(row, "translation", "en"), "translation", "key 'en'")
    german = _as_text(_key(row, "translation", "de"), "translation", "key 'de'")
    return Example(f"translate to german. english: {english}", f"german: {german}")


def _openorca(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    system_prompt = _text(row, "system_prompt", allow_empty=True)  # many OpenOrca rows have none
    question = _text(row, "question")
    source = f"{system_prompt}\n\n{question}" if system_prompt else question
    return Example(source, _text(row, "response"))


def _hc3(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    question = _text(row, "question")
    answers = [a for a in _str_list(row, "human_answers") if a]
    if not answers:
        raise RowError("human_answers", "no non-empty answer (expected at least one)")
    return Example(f"question: {question}", answers[0], references=tuple(answers))


def _template(row: Mapping[str, Any], options: Mapping[str, Any]) -> Example:
    source = _render(options["source"], row)
    target = _render(options["target"], row)
    target_columns = ", ".join(_template_columns(options["target"]))
    if not source:
        raise RowError(", ".join(_template_columns(options["source"])), "the source renders empty")
    if not target:
        raise RowError(target_columns, "the target renders empty")
    if options["labels"] is not None and target not in options["labels"]:
        raise RowError(
            target_columns, f"the target {target!r} is not one of the labels {_listing(options['labels'])}"
        )
    return Example(source, target)


def _render(template: str, row: Mapping[str, Any]) -> str:
    """str.format over the row, field by field, so a failure names the column it came from."""
    formatter = string.Formatter()
    parts = []
    for literal, field, spec, conversion in formatter.parse(template):
        parts.append(literal)
        if field is None:
            continue
        column = _top_level(field)
        _value(row, column)  # a missing or null column is a RowError like in every other task
        try:
            value, _ = formatter.get_field(field, (), row)
            if value is None:
                raise RowError(column, f"{{{field}}} is null")
            parts.append(formatter.format_field(formatter.convert_field(value, conversion), spec or ""))
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise RowError(column, f"cannot render {{{field}}}: {type(e).__name__}: {e}") from None
    return "".join(parts).strip()


def _top_level(field: str) -> str:
    """The column of a format field: "answers[text][0]" → "answers", "meta.lang" → "meta"."""
    return re.split(r"[.\[]", field, maxsplit=1)[0]


def _template_columns(template: str) -> list[str]:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    return list(dict.fromkeys(_top_level(f) for f in fields))


# ----------------------------------------------------------------------------------------------
# The table of tasks


class _Spec(NamedTuple):
    formatter: Callable[[Mapping[str, Any], Mapping[str, Any]], Example | None]
    description: str
    columns: tuple[str, ...]
    metrics: tuple[str, ...]
    defaults: Mapping[str, Any] = MappingProxyType({})
    labels: tuple[str, ...] | None = None
    answer_prefix: str | None = None
    multiple_choice: bool = False


_SCIQ_COLUMNS = ("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support")
_SQUAD_COLUMNS = ("context", "question", "answers")
_PAWS_COLUMNS = ("sentence1", "sentence2", "label")

TASKS: dict[str, _Spec] = {
    "sciq": _Spec(
        _sciq, "SciQ science multiple choice: 4 shuffled options (+ support paragraph) → answer text",
        _SCIQ_COLUMNS, ("mc_accuracy",), {"include_support": True, "seed": 0}, multiple_choice=True,
    ),
    "sciq_think": _Spec(
        _sciq_think, "SciQ with reasoning (for RL): options → <think> support sentence </think> <answer> … </answer>",
        _SCIQ_COLUMNS, ("mc_accuracy", "format_rate"), {"include_support": False, "seed": 0},
        multiple_choice=True,
    ),
    "squad_qa": _Spec(
        _squad_qa, "SQuAD extractive QA: question + context → answer span",
        _SQUAD_COLUMNS, ("exact_match", "f1"),
    ),
    "squad_qg": _Spec(
        _squad_qg, "SQuAD question generation: answer + context → question",
        _SQUAD_COLUMNS, ("rouge", "bleu"),
    ),
    "samsum": _Spec(_samsum, "SAMSum dialogue summarization", ("dialogue", "summary"), ("rouge",)),
    "imdb_sentiment": _Spec(
        _imdb_sentiment, "IMDB movie review sentiment → sentiment: True / False",
        ("text", "label"), ("accuracy", "macro_f1"), labels=("sentiment: True", "sentiment: False"),
    ),
    "emotion": _Spec(
        _emotion, "dair-ai/emotion: text → one of six emotions",
        ("text", "label"), ("accuracy", "macro_f1"), labels=EMOTIONS,
    ),
    "paws_paraphrase": _Spec(
        _paws_paraphrase, "PAWS paraphrase generation (label-1 pairs only): sentence1 → sentence2",
        _PAWS_COLUMNS, ("rouge", "bleu"),
    ),
    "paws_similarity": _Spec(
        _paws_similarity, "PAWS paraphrase detection: two sentences → yes / no",
        _PAWS_COLUMNS, ("accuracy", "macro_f1"), labels=("yes", "no"),
    ),
    "mlqa": _Spec(
        _squad_qa, "MLQA cross-lingual extractive QA (e.g. mlqa.hi.en: Hindi context, English question)",
        _SQUAD_COLUMNS, ("exact_match", "f1"),
    ),
    "wmt16_en_de": _Spec(
        _wmt16_en_de, "WMT16 English → German translation",
        ("translation",), ("bleu", "chrf"), answer_prefix="german: ",
    ),
    "openorca": _Spec(
        _openorca, "OpenOrca instruction following: system prompt + question → response",
        ("system_prompt", "question", "response"), ("rouge",),
    ),
    "hc3": _Spec(
        _hc3, "HC3 open-domain QA with human answers: question → human answer",
        ("question", "human_answers"), ("rouge",),
    ),
    "template": _Spec(
        _template, "Any dataset: source and target from Python format strings over the row's columns",
        (), ("rouge",), {"source": None, "target": None, "metrics": ["rouge"], "labels": None},
    ),
}  # fmt: skip
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


# ----------------------------------------------------------------------------------------------
# Building a task from a recipe


def build_task(name: str, options: Mapping[str, Any] | None = None) -> Task:
    """The task `name` with the recipe's options over its defaults; TaskError names what is wrong."""
    if not isinstance(name, str) or name not in TASKS:
        raise TaskError(
            "data.task",
            f"unknown task {name!r}{_suggest(name, TASK_NAMES)}; known tasks: {_listing(TASK_NAMES)}",
        )
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TaskError(
            "data.task_options", f"expected a mapping of option: value, got {type(options).__name__}"
        )
    spec = TASKS[name]
    resolved = dict(spec.defaults)
    for key, value in options.items():
        if key not in spec.defaults:
            known = f"known: {_listing(spec.defaults)}" if spec.defaults else f"task {name} takes no options"
            raise TaskError(
                f"data.task_options.{key}", f"unknown option{_suggest(key, spec.defaults)}; {known}"
            )
        resolved[key] = value
    if name == "template":
        return _template_task(resolved)
    for key, value in resolved.items():
        # Built-in options are bools and ints; type(...) is strict so that true is not taken for 1.
        expected = type(spec.defaults[key])
        if type(value) is not expected:
            raise TaskError(
                f"data.task_options.{key}", f"expected {_TYPE_NAMES[expected]}, got {_describe(value)}"
            )
    return Task(name, spec.description, spec.columns, spec.metrics, spec.labels, spec.answer_prefix,
                MappingProxyType(resolved), spec.multiple_choice)  # fmt: skip


_TYPE_NAMES = {bool: "a boolean (true or false)", int: "an integer", str: "a string"}


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _suggest(word: Any, known: Sequence[str]) -> str:
    """' (did you mean X or Y?)' for the known names close to `word`, in their listed order, or ''."""
    word = str(word).lower()
    close = set(difflib.get_close_matches(word, list(known), n=3))
    # difflib misses stems and longer spellings ("squad", "paws", "mlqa_hi_en"): prefixes count too.
    close |= {k for k in known if len(word) >= 3 and (k.startswith(word) or word.startswith(k))}
    return f" (did you mean {' or '.join(k for k in known if k in close)}?)" if close else ""


def _template_task(options: dict[str, Any]) -> Task:
    """The template task: its columns, metrics and labels come from its options."""
    for key in ("source", "target"):
        template = options[key]
        where = f"data.task_options.{key}"
        if template is None:
            raise TaskError(
                where,
                "required by the template task: a format string over the row's columns, e.g. '{question}'",
            )
        if not isinstance(template, str):
            raise TaskError(where, f"expected a format string, got {_describe(template)}")
        try:
            fields = [(f, s) for _, f, s, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as e:
            raise TaskError(where, f"not a valid format string ({e}): {template!r}") from None
        if not fields:
            raise TaskError(
                where, f"names no column; put column names in braces, e.g. '{{question}}': {template!r}"
            )
        for field, spec in fields:
            # "{}" and "{0}" are positional: a row has no positional values, only named columns.
            if not _top_level(field) or _top_level(field).isdigit():
                raise TaskError(
                    where, f"{{{field}}} is positional; name a column instead, e.g. '{{question}}'"
                )
            if "{" in (spec or ""):
                raise TaskError(
                    where, f"{{{field}:{spec}}}: nested fields in a format spec are not supported"
                )
    metrics = options["metrics"]
    if not isinstance(metrics, list | tuple) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise TaskError(
            "data.task_options.metrics",
            f"expected a non-empty list of metric names, got {_describe(metrics)}",
        )
    for metric in metrics:
        if metric not in METRIC_NAMES:
            raise TaskError(
                "data.task_options.metrics",
                f"unknown metric {metric!r}{_suggest(metric, METRIC_NAMES)}; known: {_listing(METRIC_NAMES)}",
            )
    labels = options["labels"]
    if labels is not None and (
        not isinstance(labels, list | tuple)
        or not labels
        or not all(isinstance(x, str) and x.strip() for x in labels)
    ):
        raise TaskError(
            "data.task_options.labels",
            f"expected a list of non-empty strings or null, got {_describe(labels)}",
        )
    # Targets are stripped before they are compared with the labels, so compare stripped labels.
    options["labels"] = None if labels is None else [x.strip() for x in labels]
    columns = tuple(
        dict.fromkeys(_template_columns(options["source"]) + _template_columns(options["target"]))
    )
    spec = TASKS["template"]
    return Task("template", spec.description, columns, tuple(metrics),
                None if labels is None else tuple(options["labels"]), None, MappingProxyType(options))  # fmt: skip
