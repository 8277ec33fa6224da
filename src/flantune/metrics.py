"""Generation metrics: ROUGE, BLEU, chrF, SQuAD EM/F1, accuracy, macro-F1, multiple choice, format rate.

    compute_metrics  corpus-level scores (x100) for a list of metric names
    row_scores       per-row scores for predictions.jsonl; their means equal compute_metrics for the
                     row-decomposable metrics (rouge, exact_match, f1, accuracy, mc_accuracy, format_rate)
    extract_answer / is_well_formed / normalize_answer   small helpers the RL rewards reuse
    chosen_option    the option a multiple-choice answer names (the report's confusion matrix)

ROUGE comes from `rouge_score` and BLEU/chrF from `sacrebleu`, so numbers compare with published ones.
`evaluate.load()` is not used: it fetches metric code from a hub at run time.

`references` holds, per row, every acceptable reference with the main one first. Metrics that take
several references (rouge, bleu, chrf, exact_match, f1) use them all; accuracy, macro_f1 and
mc_accuracy use the main one.
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import sacrebleu

from flantune.tasks import METRIC_NAMES  # the names this module computes; tasks.py holds the list

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# --- small helpers (also used by the RL rewards) -------------------------------------------------

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_WELL_FORMED_RE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# A bare option letter: "A", "(B)", "c)", "D." or "B:"; anything longer is read as answer text.
_LETTER_RE = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_PUNCTUATION = frozenset(string.punctuation)


def extract_answer(text: str) -> str:
    """The text inside the first <answer>…</answer>, else the whole text; stripped either way."""
    match = _ANSWER_RE.search(text)
    return (match.group(1) if match else text).strip()


def is_well_formed(text: str) -> bool:
    """`<think> … </think> <answer> … </answer>`: both non-empty, in that order, only whitespace around."""
    match = _WELL_FORMED_RE.fullmatch(text)
    if not match:
        return False
    think, answer = match.group(1), match.group(2)
    # Non-greedy groups can still swallow a second block ("…</answer> <answer>…"): a tag inside
    # either part means the output is not one think block followed by one answer block.
    if any(tag in part for part in (think, answer) for tag in _TAGS):
        return False
    return bool(think.strip()) and bool(answer.strip())


# SQuAD EM/F1 follow the official SQuAD v1.1 evaluation script (evaluate-v1.1.py) line for line:
# no installable library ships it without a hub download (evaluate.load("squad") fetches it).
def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _squad_f1(prediction: str, reference: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    common = Counter(pred_tokens) & Counter(ref_tokens)
    num_same = sum(common.values())
    # As in v1.1, no overlap (including two empty answers) scores 0.
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def _squad_em(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


# --- per-row scorers ------------------------------------------------------------------------------


def _split_sentences(text: str) -> str:
    """One sentence per line, which rougeLsum needs (the HF convention uses nltk punkt, not available
    offline; a split after . ! ? followed by whitespace, plus existing line breaks, stands in)."""
    sentences = re.split(r"(?<=[.!?])\s+|\n+", text.strip())
    return "\n".join(s for s in sentences if s)


def _rouge_rows(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    from rouge_score import rouge_scorer  # here, not at import: rouge_score pulls in nltk and scipy (~2 s)

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    _warn_if_rouge_blind(references)
    rows = []
    for pred, refs in zip(predictions, references, strict=True):
        # rougeLsum reads sentences from line breaks, the other types ignore them; splitting both
        # sides therefore only changes rougeLsum.
        split_refs = [_split_sentences(r) for r in refs]
        # score_multi: per ROUGE type, the reference with the best F-measure (as HF evaluate does).
        scores = scorer.score_multi(split_refs, _split_sentences(pred))
        rows.append({name: 100 * scores[name].fmeasure for name in ROUGE_TYPES})
    return rows


def _warn_if_rouge_blind(references: Sequence[Sequence[str]]) -> None:
    """rouge_score's tokenizer keeps only [a-z0-9]: non-Latin text scores 0 without a word of warning."""
    from rouge_score import tokenize as rouge_tokenize

    blind = sum(1 for refs in references if refs[0].strip() and not rouge_tokenize.tokenize(refs[0], None))
    if blind:
        warnings.warn(
            f"ROUGE: {blind} of {len(references)} references have no [a-z0-9] tokens (non-Latin script?); "
            "rouge_score drops such characters, so these rows score 0. Prefer chrf or bleu here.",
            stacklevel=4,  # the caller of compute_metrics / row_scores
        )


def _letter_index(answer: str) -> int | None:
    match = _LETTER_RE.fullmatch(answer.strip())
    return ord(match.group(1).upper()) - ord("A") if match else None


def _mc_correct(prediction: str, reference: str, options: Sequence[str] | None) -> bool:
    """The answer (inside <answer> when tagged) names the right option, by text or by letter. A
    tagged reference (sciq_think's "<think> ... </think> <answer> X </answer>") counts by its answer."""
    answer, reference = extract_answer(prediction), extract_answer(reference)
    norm_answer, norm_ref = normalize_answer(answer), normalize_answer(reference)
    # An empty answer is never right, even against a reference that normalizes to "" (e.g. "A").
    if norm_answer and norm_answer == norm_ref:
        return True
    letter = _letter_index(answer)
    if letter is None:
        return False
    ref_letter = _letter_index(reference)
    if ref_letter is not None:  # a dataset whose target is itself a letter ("B")
        return letter == ref_letter
    return bool(options) and letter < len(options) and normalize_answer(options[letter]) == norm_ref


def chosen_option(text: str, options: Sequence[str]) -> int | None:
    """The option (0-based) that `text` names, inside <answer> when tagged: by its text, normalized as
    mc_accuracy compares it, or by its letter; None when it names none of `options`. The report's
    multiple-choice confusion matrix reads predictions and references through it."""
    answer = extract_answer(text)
    norm = normalize_answer(answer)
    if norm:
        for k, option in enumerate(options):
            if normalize_answer(option) == norm:
                return k
    letter = _letter_index(answer)
    return letter if letter is not None and letter < len(options) else None


def _correct(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def _row_bleu(pred: str, refs: Sequence[str]) -> float:
    return sacrebleu.sentence_bleu(pred, list(refs)).score


def _row_chrf(pred: str, refs: Sequence[str]) -> float:
    return sacrebleu.sentence_chrf(pred, list(refs)).score


def _row_em(pred: str, refs: Sequence[str]) -> float:
    return 100 * max(_squad_em(pred, r) for r in refs)


def _row_f1(pred: str, refs: Sequence[str]) -> float:
    return 100 * max(_squad_f1(pred, r) for r in refs)


def _row_accuracy(pred: str, refs: Sequence[str]) -> float:
    return 100.0 * _correct(pred, refs[0])


def _row_format(pred: str, refs: Sequence[str]) -> float:
    return 100.0 * is_well_formed(pred)


# Metrics scored row by row from (prediction, references); compute_metrics takes their mean.
_ROW_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "exact_match": _row_em,
    "f1": _row_f1,
    "accuracy": _row_accuracy,
    "format_rate": _row_format,
}

# --- corpus-level scorers -------------------------------------------------------------------------


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Per-row reference lists → sacrebleu's per-stream lists. Rows with fewer references get None,
    sacrebleu's documented marker for a variable number of references per segment."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def _macro_f1(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str] | None) -> float:
    gold = [r.strip() for r in references]
    pred = [p.strip() for p in predictions]
    label_set = list(dict.fromkeys(label.strip() for label in labels)) if labels else sorted(set(gold))
    unknown = sorted(set(gold) - set(label_set))
    if unknown:
        raise ValueError(f"macro_f1: references {unknown[:5]} are not in the label set {label_set}")
    per_label = []
    for label in label_set:
        tp = sum(1 for p, g in zip(pred, gold, strict=True) if p == label and g == label)
        fp = sum(1 for p, g in zip(pred, gold, strict=True) if p == label and g != label)
        fn = sum(1 for p, g in zip(pred, gold, strict=True) if p != label and g == label)
        # A label never referenced nor predicted has F1 0/0: it is left out of the average (sklearn's
        # zero_division=nan) rather than counted as 0, so a small eval slice missing a rare class is not
        # penalised for it. Predictions outside the label set are never a class: they only add a FN.
        if tp + fp + fn:
            per_label.append(2 * tp / (2 * tp + fp + fn))
    return 100 * sum(per_label) / len(per_label)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


# --- public API -----------------------------------------------------------------------------------


def compute_metrics(
    names: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    choices: Sequence[Sequence[str]] | None = None,
    labels: Sequence[str] | None = None,
    answer_prefix: str | None = None,
) -> dict[str, float]:
    """Corpus scores, all on a 0-100 scale. "rouge" gives rouge1/rouge2/rougeL/rougeLsum; every other
    name gives one key of its own name. Raises ValueError on unknown names or malformed input."""
    names = _check_names(names)
    _check_rows(predictions, references, choices)
    predictions, references = _strip_prefix(predictions, references, answer_prefix)

    results: dict[str, float] = {}
    for name in names:
        if name == "rouge":
            rows = _rouge_rows(predictions, references)
            results.update({t: _mean([row[t] for row in rows]) for t in ROUGE_TYPES})
        elif name == "bleu":
            results["bleu"] = sacrebleu.corpus_bleu(list(predictions), _reference_streams(references)).score
        elif name == "chrf":
            results["chrf"] = sacrebleu.corpus_chrf(list(predictions), _reference_streams(references)).score
        elif name == "macro_f1":
            results["macro_f1"] = _macro_f1(predictions, [refs[0] for refs in references], labels)
        elif name == "mc_accuracy":
            results["mc_accuracy"] = _mean(_mc_rows(predictions, references, choices))
        else:
            scorer = _ROW_METRICS[name]
            results[name] = _mean([scorer(p, r) for p, r in zip(predictions, references, strict=True)])
    return results


def row_scores(
    names: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    choices: Sequence[Sequence[str]] | None = None,
    answer_prefix: str | None = None,
) -> list[dict[str, float]]:
    """Per-row scores (0-100): rougeL, sentence BLEU and chrF, EM, F1, and 0/100 for accuracy,
    mc_accuracy and format_rate. macro_f1 has no per-row value and adds no key."""
    names = _check_names(names)
    _check_rows(predictions, references, choices)
    predictions, references = _strip_prefix(predictions, references, answer_prefix)

    rows: list[dict[str, float]] = [{} for _ in predictions]
    for name in names:
        if name == "rouge":
            values = [r["rougeL"] for r in _rouge_rows(predictions, references)]
            key = "rougeL"
        elif name == "bleu":
            values = [_row_bleu(p, r) for p, r in zip(predictions, references, strict=True)]
            key = "bleu"
        elif name == "chrf":
            values = [_row_chrf(p, r) for p, r in zip(predictions, references, strict=True)]
            key = "chrf"
        elif name == "macro_f1":
            continue
        elif name == "mc_accuracy":
            values, key = _mc_rows(predictions, references, choices), "mc_accuracy"
        else:
            values = [_ROW_METRICS[name](p, r) for p, r in zip(predictions, references, strict=True)]
            key = name
        for row, value in zip(rows, values, strict=True):
            row[key] = value
    return rows


def _mc_rows(
    predictions: Sequence[str], references: Sequence[Sequence[str]], choices: Sequence[Sequence[str]] | None
) -> list[float]:
    options = choices if choices is not None else [None] * len(predictions)
    return [
        100.0 * _mc_correct(p, refs[0], opts)
        for p, refs, opts in zip(predictions, references, options, strict=True)
    ]


# --- input checks -----------------------------------------------------------------------------------


def _check_names(names: Sequence[str]) -> list[str]:
    # A bare string would be read letter by letter ("rouge" → "r", "o", ...).
    if isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known metrics: {', '.join(METRIC_NAMES)}")
    return list(dict.fromkeys(names))


def _check_rows(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    choices: Sequence[Sequence[str]] | None,
) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference rows")
    if choices is not None and len(choices) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(choices)} rows of choices")
    if not predictions:
        raise ValueError("no predictions to score: a metric over zero rows is undefined")
    for i, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        if not isinstance(pred, str):
            raise ValueError(f"row {i}: prediction is {type(pred).__name__}, not str")
        # A flat list of strings (one reference per row, unwrapped) would be read as characters.
        if isinstance(refs, str):
            raise ValueError(f"row {i}: references must be a list of strings per row, e.g. [[ref], ...]")
        if not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"row {i}: needs at least one reference, all strings (got {refs!r})")


def _strip_prefix(
    predictions: Sequence[str], references: Sequence[Sequence[str]], prefix: str | None
) -> tuple[list[str], list[list[str]]]:
    """Remove a task prefix such as "german: " from the start of predictions and references, so the
    metric scores the answer, not the boilerplate both sides share."""
    if not prefix or not prefix.strip():
        return list(predictions), [list(refs) for refs in references]
    head = prefix.strip()

    def strip(text: str) -> str:
        body = text.lstrip()
        return body[len(head) :].lstrip() if body.startswith(head) else text

    return [strip(p) for p in predictions], [[strip(r) for r in refs] for refs in references]
