"""Tasks: each public schema gives the exact source/target, SciQ shuffles stably, bad rows and bad
options are named, and every sample file under examples/data formats with its tasks."""

import json
import os
import re
import subprocess
import sys

import pytest

from flantune.config import load_recipe
from flantune.tasks import (
    METRIC_NAMES,
    TASK_NAMES,
    Example,
    RowError,
    TaskError,
    build_task,
)

from .conftest import ROOT, SCIQ, need

EXAMPLES = ROOT / "examples" / "data"
THINK_FORMAT = re.compile(r"^<think> .+ </think> <answer> .+ </answer>$")

SCIQ_ROW = {
    "question": "What gas do plants absorb from the air for photosynthesis?",
    "distractor1": "oxygen",
    "distractor2": "nitrogen",
    "distractor3": "helium",
    "correct_answer": "carbon dioxide",
    "support": "Plants take in carbon dioxide through small pores in their leaves. They release oxygen as a by-product.",
}
# The pinned order for SCIQ_ROW with seed 0: (A) helium (B) oxygen (C) nitrogen (D) carbon dioxide.
SCIQ_OPTIONS = "options: (A) helium (B) oxygen (C) nitrogen (D) carbon dioxide"
SCIQ_CHOICES = ("helium", "oxygen", "nitrogen", "carbon dioxide")
SCIQ_QUESTION = "question: What gas do plants absorb from the air for photosynthesis?"

SQUAD_ROW = {
    "id": "5a1b",
    "title": "Great_Barrier_Reef",
    "context": "The Great Barrier Reef lies off the coast of Queensland. It was declared a World Heritage Site in 1981.",
    "question": "In what year did the reef become a World Heritage Site?",
    "answers": {"text": ["1981", "in 1981", "1981"], "answer_start": [98, 95, 98]},
}
MLQA_ROW = {
    "id": "c0ffee",
    "title": "ताजमहल",
    "context": "ताजमहल आगरा में यमुना नदी के किनारे स्थित है।",
    "question": "Which river is the Taj Mahal beside?",
    "answers": {"text": ["यमुना नदी"], "answer_start": [16]},
}
PAWS_ROW = {
    "id": 7,
    "sentence1": "Lisbon lies to the west of Madrid .",
    "sentence2": "Madrid lies to the east of Lisbon .",
    "label": 1,
}
HC3_ROW = {
    "id": "3",
    "question": "Why does ice float on water? Please explain like I'm five.",
    "human_answers": ["  Ice is less dense than water. ", "", "Frozen water takes up more room.  "],
    "chatgpt_answers": ["Ice is less dense than liquid water."],
    "source": "reddit_eli5",
}
TEMPLATE_OPTIONS = {
    "source": "Q: {question} P: {context}",
    "target": "{answers[text][0]}",
    "metrics": ["exact_match"],
}

# (task, options, row, expected example). Full strings, so any change to a format shows up here.
CASES = {
    "sciq": ("sciq", None, SCIQ_ROW, Example(
        f"{SCIQ_QUESTION} {SCIQ_OPTIONS} context: {SCIQ_ROW['support']}", "carbon dioxide", choices=SCIQ_CHOICES)),
    "sciq without support": ("sciq", {"include_support": False}, SCIQ_ROW, Example(
        f"{SCIQ_QUESTION} {SCIQ_OPTIONS}", "carbon dioxide", choices=SCIQ_CHOICES)),
    "sciq empty support": ("sciq", None, {**SCIQ_ROW, "support": "  "}, Example(
        f"{SCIQ_QUESTION} {SCIQ_OPTIONS}", "carbon dioxide", choices=SCIQ_CHOICES)),
    "sciq_think": ("sciq_think", None, SCIQ_ROW, Example(
        f"{SCIQ_QUESTION} {SCIQ_OPTIONS}",
        "<think> Plants take in carbon dioxide through small pores in their leaves. </think> "
        "<answer> carbon dioxide </answer>", choices=SCIQ_CHOICES)),
    "sciq_think answer in a later sentence": ("sciq_think", {"include_support": True}, {
        **SCIQ_ROW, "support": "Leaves have pores called stomata! Through them, plants take in Carbon Dioxide. Water leaves too."},
        Example(
            f"{SCIQ_QUESTION} {SCIQ_OPTIONS} context: Leaves have pores called stomata! Through them, plants take in "
            "Carbon Dioxide. Water leaves too.",
            "<think> Through them, plants take in Carbon Dioxide. </think> <answer> carbon dioxide </answer>",
            choices=SCIQ_CHOICES)),
    "sciq_think answer not in support": ("sciq_think", None, {
        **SCIQ_ROW, "support": "Leaves have pores called stomata. Gases pass through them?   Yes."}, Example(
        f"{SCIQ_QUESTION} {SCIQ_OPTIONS}",
        "<think> Leaves have pores called stomata. </think> <answer> carbon dioxide </answer>", choices=SCIQ_CHOICES)),
    "sciq_think no support": ("sciq_think", None, {**SCIQ_ROW, "support": ""}, Example(
        f"{SCIQ_QUESTION} {SCIQ_OPTIONS}",
        "<think> The answer is carbon dioxide. </think> <answer> carbon dioxide </answer>", choices=SCIQ_CHOICES)),
    "squad_qa": ("squad_qa", None, SQUAD_ROW, Example(
        f"question: {SQUAD_ROW['question']} context: {SQUAD_ROW['context']}", "1981", references=("1981", "in 1981"))),
    "squad_qg": ("squad_qg", None, SQUAD_ROW, Example(
        f"generate question: answer: 1981 context: {SQUAD_ROW['context']}", SQUAD_ROW["question"])),
    "samsum": ("samsum", None, {
        "id": "1", "dialogue": "Amy: Lunch at 1?\r\nBob: Sure, see you there.\r\n", "summary": " Amy and Bob meet for lunch at 1. "},
        Example("summarize: Amy: Lunch at 1?\r\nBob: Sure, see you there.", "Amy and Bob meet for lunch at 1.")),
    "imdb positive": ("imdb_sentiment", None, {"text": "Loved it.<br /><br />Great  cast.<br/>Go see it<BR>now.", "label": 1},
        Example("sentiment analysis: Loved it. Great cast. Go see it now.", "sentiment: True")),
    "imdb negative": ("imdb_sentiment", None, {"text": "Dull and far too long.", "label": 0},
        Example("sentiment analysis: Dull and far too long.", "sentiment: False")),
    "emotion id": ("emotion", None, {"text": "i feel nervous about tomorrow", "label": 4},
        Example("emotion classification: i feel nervous about tomorrow", "fear")),
    "emotion name": ("emotion", None, {"text": "i feel amazed", "label": "surprise"},
        Example("emotion classification: i feel amazed", "surprise")),
    "paws_paraphrase": ("paws_paraphrase", None, PAWS_ROW,
        Example("paraphrase: Lisbon lies to the west of Madrid .", "Madrid lies to the east of Lisbon .")),
    "paws_paraphrase leaves out label 0": ("paws_paraphrase", None, {**PAWS_ROW, "label": 0}, None),
    "paws_similarity yes": ("paws_similarity", None, PAWS_ROW, Example(
        "paraphrase detection: sentence1: Lisbon lies to the west of Madrid . sentence2: Madrid lies to the east of Lisbon .",
        "yes")),
    "paws_similarity no": ("paws_similarity", None, {**PAWS_ROW, "label": 0}, Example(
        "paraphrase detection: sentence1: Lisbon lies to the west of Madrid . sentence2: Madrid lies to the east of Lisbon .",
        "no")),
    "mlqa": ("mlqa", None, MLQA_ROW, Example(
        "question: Which river is the Taj Mahal beside? context: ताजमहल आगरा में यमुना नदी के किनारे स्थित है।",
        "यमुना नदी", references=("यमुना नदी",))),
    "wmt16_en_de": ("wmt16_en_de", None, {"translation": {"de": "Der Zug hat Verspätung.", "en": "The train is late."}},
        Example("translate to german. english: The train is late.", "german: Der Zug hat Verspätung.")),
    "openorca with system prompt": ("openorca", None, {
        "id": "t0.1", "system_prompt": "You are a helpful assistant.", "question": "What is the capital of Canada?",
        "response": "Ottawa."},
        Example("You are a helpful assistant.\n\nWhat is the capital of Canada?", "Ottawa.")),
    "openorca without system prompt": ("openorca", None, {
        "id": "niv.2", "system_prompt": "", "question": "What is 2 + 2?", "response": "4"},
        Example("What is 2 + 2?", "4")),
    "hc3": ("hc3", None, HC3_ROW, Example(
        "question: Why does ice float on water? Please explain like I'm five.", "Ice is less dense than water.",
        references=("Ice is less dense than water.", "Frozen water takes up more room."))),
    "template": ("template", TEMPLATE_OPTIONS, SQUAD_ROW, Example(
        f"Q: {SQUAD_ROW['question']} P: {SQUAD_ROW['context']}", "1981")),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_row_formats_exactly(case):
    name, options, row, expected = CASES[case]
    assert build_task(name, options).format(row) == expected


# task → (columns, metrics, labels, answer_prefix)
METADATA = {
    "sciq": (("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"), ("mc_accuracy",), None, None),
    "sciq_think": (("question", "distractor1", "distractor2", "distractor3", "correct_answer", "support"),
                   ("mc_accuracy", "format_rate"), None, None),
    "squad_qa": (("context", "question", "answers"), ("exact_match", "f1"), None, None),
    "squad_qg": (("context", "question", "answers"), ("rouge", "bleu"), None, None),
    "samsum": (("dialogue", "summary"), ("rouge",), None, None),
    "imdb_sentiment": (("text", "label"), ("accuracy", "macro_f1"), ("sentiment: True", "sentiment: False"), None),
    "emotion": (("text", "label"), ("accuracy", "macro_f1"), ("sadness", "joy", "love", "anger", "fear", "surprise"), None),
    "paws_paraphrase": (("sentence1", "sentence2", "label"), ("rouge", "bleu"), None, None),
    "paws_similarity": (("sentence1", "sentence2", "label"), ("accuracy", "macro_f1"), ("yes", "no"), None),
    "mlqa": (("context", "question", "answers"), ("exact_match", "f1"), None, None),
    "wmt16_en_de": (("translation",), ("bleu", "chrf"), None, "german: "),
    "openorca": (("system_prompt", "question", "response"), ("rouge",), None, None),
    "hc3": (("question", "human_answers"), ("rouge",), None, None),
    "template": (("question", "context", "answers"), ("exact_match",), None, None),
}  # fmt: skip


def test_task_names_and_metadata():
    assert set(TASK_NAMES) == set(METADATA)
    for name in TASK_NAMES:
        task = build_task(name, TEMPLATE_OPTIONS if name == "template" else None)
        assert (task.columns, task.metrics, task.labels, task.answer_prefix) == METADATA[name], name
        assert task.name == name and task.description and "\n" not in task.description
        assert set(task.metrics) <= set(METRIC_NAMES)


def test_metric_names_match_the_metrics_module():
    from flantune import metrics

    assert metrics.METRIC_NAMES == METRIC_NAMES


def test_options_are_resolved_over_defaults_and_read_only():
    assert dict(build_task("sciq").options) == {"include_support": True, "seed": 0}
    assert dict(build_task("sciq_think").options) == {"include_support": False, "seed": 0}
    assert dict(build_task("sciq", {"seed": 3}).options) == {"include_support": True, "seed": 3}
    assert dict(build_task("samsum").options) == {}
    with pytest.raises(TypeError):
        build_task("sciq").options["seed"] = 1  # type: ignore[index]


def test_classification_targets_are_labels():
    for name, rows in [
        ("imdb_sentiment", [{"text": "ok", "label": i} for i in (0, 1)]),
        ("emotion", [{"text": "i feel", "label": i} for i in range(6)]),
        ("paws_similarity", [{**PAWS_ROW, "label": i} for i in (0, 1)]),
    ]:
        task = build_task(name)
        assert {task.format(row).target for row in rows} == set(task.labels)


# ----------------------------------------------------------------------------------------------
# SciQ shuffling


def sciq_rows(n: int) -> list[dict]:
    return [
        {
            **SCIQ_ROW,
            "question": f"Question number {i}?",
            "correct_answer": f"right {i}",
            "distractor1": f"wrong a{i}",
        }
        for i in range(n)
    ]


def test_sciq_shuffle_is_deterministic_and_complete():
    first, second = build_task("sciq").format(SCIQ_ROW), build_task("sciq").format(dict(SCIQ_ROW))
    assert first == second and first.choices == SCIQ_CHOICES
    for row in sciq_rows(50):
        choices = build_task("sciq").format(row).choices
        options = [row["correct_answer"], row["distractor1"], row["distractor2"], row["distractor3"]]
        assert sorted(choices) == sorted(options)


def test_sciq_order_does_not_depend_on_the_process():
    # hash() is salted per process; a stable hash gives the same order under any PYTHONHASHSEED.
    code = (
        "import json, sys; from flantune.tasks import build_task; "
        "print(json.dumps(build_task('sciq').format(json.loads(sys.argv[1])).choices))"
    )
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", code, json.dumps(SCIQ_ROW)],
            capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": seed}, check=True,
        )  # fmt: skip
        assert tuple(json.loads(result.stdout)) == SCIQ_CHOICES


def test_sciq_seed_changes_orders():
    rows = sciq_rows(20)
    orders = {seed: [build_task("sciq", {"seed": seed}).format(r).choices for r in rows] for seed in (0, 1)}
    assert orders[0] != orders[1]
    assert orders[0] == [build_task("sciq", {"seed": 0}).format(r).choices for r in rows]
    # sciq and sciq_think shuffle alike, so a model sees the same options in both.
    assert orders[0] == [build_task("sciq_think").format(r).choices for r in rows]


def real_sciq() -> list[dict]:
    return json.loads(need(SCIQ).read_text())


def test_sciq_answer_position_varies_on_real_rows():
    task = build_task("sciq")
    positions = {task.format(row).choices.index(row["correct_answer"]) for row in real_sciq()[:100]}
    assert positions == {0, 1, 2, 3}


def test_all_real_sciq_rows_format():
    rows = real_sciq()
    assert len(rows) == 1000
    sciq, think = build_task("sciq"), build_task("sciq_think")
    for row in rows:
        example = sciq.format(row)
        assert example.target == row["correct_answer"] and len(example.choices) == 4
        assert (" context: " in example.source) == bool(row["support"].strip())
        reasoned = think.format(row)
        assert THINK_FORMAT.match(reasoned.target), reasoned.target
        assert reasoned.target.endswith(f"<answer> {row['correct_answer']} </answer>")
        assert " context: " not in reasoned.source and reasoned.choices == example.choices


# ----------------------------------------------------------------------------------------------
# Bad rows: every task names the column and says what is wrong


def without(row: dict, column: str) -> dict:
    return {k: v for k, v in row.items() if k != column}


WMT_ROW = {"translation": {"de": "Hallo.", "en": "Hello."}}
ORCA_ROW = {"id": "x", "system_prompt": "", "question": "Why?", "response": "Because."}

# (task, row, column, words the problem must contain)
BAD_ROWS = {
    "sciq missing question": ("sciq", without(SCIQ_ROW, "question"), "question", "missing column"),
    "sciq null distractor": ("sciq", {**SCIQ_ROW, "distractor2": None}, "distractor2", "is null"),
    "sciq int answer": ("sciq", {**SCIQ_ROW, "correct_answer": 7}, "correct_answer", "expected a string, got int"),
    "sciq empty answer": ("sciq", {**SCIQ_ROW, "correct_answer": " "}, "correct_answer", "is empty"),
    "sciq empty distractor": ("sciq_think", {**SCIQ_ROW, "distractor3": ""}, "distractor3", "is empty"),
    "sciq missing support": ("sciq", without(SCIQ_ROW, "support"), "support", "missing column"),
    "sciq null support": ("sciq_think", {**SCIQ_ROW, "support": None}, "support", "is null"),
    "squad missing answers": ("squad_qa", without(SQUAD_ROW, "answers"), "answers", "missing column"),
    "squad no answer": ("squad_qa", {**SQUAD_ROW, "answers": {"text": [], "answer_start": []}}, "answers", "no answer"),
    "squad empty answer": ("squad_qa", {**SQUAD_ROW, "answers": {"text": [""], "answer_start": [0]}}, "answers", "text[0]: is empty"),
    "squad answers not an object": ("squad_qa", {**SQUAD_ROW, "answers": ["1981"]}, "answers", "expected an object"),
    "squad answers without text": ("squad_qg", {**SQUAD_ROW, "answers": {"answer_start": [0]}}, "answers", "missing key 'text'"),
    "squad answer text not a list": ("mlqa", {**SQUAD_ROW, "answers": {"text": "1981"}}, "answers", "expected a list of strings"),
    "squad int answer": ("squad_qa", {**SQUAD_ROW, "answers": {"text": [1981]}}, "answers", "text[0]: expected a string, got int"),
    "squad null context": ("squad_qa", {**SQUAD_ROW, "context": None}, "context", "is null"),
    "squad_qg empty question": ("squad_qg", {**SQUAD_ROW, "question": "\n"}, "question", "is empty"),
    "samsum empty summary": ("samsum", {"id": "1", "dialogue": "A: hi", "summary": ""}, "summary", "is empty"),
    "samsum list dialogue": ("samsum", {"dialogue": ["A: hi"], "summary": "A greets."}, "dialogue", "expected a string, got list"),
    "imdb label 2": ("imdb_sentiment", {"text": "Fine.", "label": 2}, "label", "expected one of 0, 1, got 2"),
    "imdb bool label": ("imdb_sentiment", {"text": "Fine.", "label": True}, "label", "got bool True"),
    "imdb string label": ("imdb_sentiment", {"text": "Fine.", "label": "pos"}, "label", "got str 'pos'"),
    "imdb only line breaks": ("imdb_sentiment", {"text": "<br /><br />", "label": 1}, "text", "is empty"),
    "imdb missing label": ("imdb_sentiment", {"text": "Fine."}, "label", "missing column"),
    "emotion label 6": ("emotion", {"text": "i feel", "label": 6}, "label", "expected one of 0, 1, 2, 3, 4, 5, got 6"),
    "emotion unknown name": ("emotion", {"text": "i feel", "label": "happy"}, "label", "got 'happy'"),
    "emotion null label": ("emotion", {"text": "i feel", "label": None}, "label", "is null"),
    "emotion float label": ("emotion", {"text": "i feel", "label": 1.0}, "label", "got float 1.0"),
    "paws label 2": ("paws_paraphrase", {**PAWS_ROW, "label": 2}, "label", "expected one of 0, 1"),
    "paws label-0 row still checked": ("paws_paraphrase", {**PAWS_ROW, "label": 0, "sentence2": None}, "sentence2", "is null"),
    "paws missing sentence1": ("paws_similarity", without(PAWS_ROW, "sentence1"), "sentence1", "missing column"),
    "wmt missing de": ("wmt16_en_de", {"translation": {"en": "Hello."}}, "translation", "missing key 'de'"),
    "wmt empty de": ("wmt16_en_de", {"translation": {"de": " ", "en": "Hello."}}, "translation", "key 'de': is empty"),
    "wmt null en": ("wmt16_en_de", {"translation": {"de": "Hallo.", "en": None}}, "translation", "key 'en': is null"),
    "wmt translation string": ("wmt16_en_de", {"translation": "Hello."}, "translation", "expected an object"),
    "openorca missing system prompt": ("openorca", without(ORCA_ROW, "system_prompt"), "system_prompt", "missing column"),
    "openorca null system prompt": ("openorca", {**ORCA_ROW, "system_prompt": None}, "system_prompt", "is null"),
    "openorca empty response": ("openorca", {**ORCA_ROW, "response": ""}, "response", "is empty"),
    "hc3 no human answers": ("hc3", {**HC3_ROW, "human_answers": []}, "human_answers", "no non-empty answer"),
    "hc3 only empty answers": ("hc3", {**HC3_ROW, "human_answers": [" ", ""]}, "human_answers", "no non-empty answer"),
    "hc3 answers a string": ("hc3", {**HC3_ROW, "human_answers": "Yes."}, "human_answers", "expected a list of strings, got str"),
    "hc3 null answer": ("hc3", {**HC3_ROW, "human_answers": ["Yes.", None]}, "human_answers", "item 1: is null"),
    "template missing column": ("template", without(SQUAD_ROW, "context"), "context", "missing column"),
    "template null column": ("template", {**SQUAD_ROW, "question": None}, "question", "is null"),
    "template bad index": ("template", {**SQUAD_ROW, "answers": {"text": []}}, "answers", "cannot render {answers[text][0]}"),
    "template empty target": ("template", {**SQUAD_ROW, "answers": {"text": ["  "]}}, "answers", "target renders empty"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_row_names_its_column(case):
    name, row, column, words = BAD_ROWS[case]
    task = build_task(name, TEMPLATE_OPTIONS if name == "template" else None)
    with pytest.raises(RowError) as info:
        task.format(row)
    assert info.value.column == column
    assert words in info.value.problem
    assert str(info.value) == f"{column}: {info.value.problem}"


def test_errors_survive_pickling():
    import pickle

    row_error = pickle.loads(pickle.dumps(RowError("label", "is null")))
    assert (row_error.column, row_error.problem, str(row_error)) == ("label", "is null", "label: is null")
    task_error = pickle.loads(pickle.dumps(TaskError("data.task", "unknown task")))
    assert str(task_error) == "data.task: unknown task" and isinstance(task_error, ValueError)


# ----------------------------------------------------------------------------------------------
# The template task


def test_template_renders_nested_fields_and_any_value_type():
    task = build_task("template", {"source": "{meta[lang]} {n:03d} {tags[1]!r}", "target": "{label}"})
    assert task.columns == ("meta", "n", "tags", "label")
    assert task.metrics == ("rouge",) and task.labels is None
    example = task.format({"meta": {"lang": "en"}, "n": 7, "tags": ["a", "b"], "label": 1})
    assert example == Example("en 007 'b'", "1")


def test_template_labels_check_targets():
    task = build_task(
        "template", {"source": "{q}", "target": "{a}", "metrics": ["accuracy"], "labels": ["yes", " no"]}
    )
    assert task.labels == ("yes", "no") and task.metrics == ("accuracy",)
    assert task.format({"q": "Is it?", "a": " no"}) == Example("Is it?", "no")
    with pytest.raises(RowError, match="'maybe' is not one of the labels yes, no") as info:
        task.format({"q": "Is it?", "a": "maybe"})
    assert info.value.column == "a"


def test_template_nested_null_is_a_row_error():
    task = build_task("template", TEMPLATE_OPTIONS)
    with pytest.raises(RowError, match=r"\{answers\[text\]\[0\]\} is null"):
        task.format({**SQUAD_ROW, "answers": {"text": [None]}})


# ----------------------------------------------------------------------------------------------
# build_task errors name the recipe key


def task_error(name, options=None) -> str:
    with pytest.raises(TaskError) as info:
        build_task(name, options)
    return str(info.value)


def test_unknown_task_suggests_the_close_name():
    message = task_error("squad")
    assert message.startswith("data.task: unknown task 'squad' (did you mean squad_qa or squad_qg?)")
    assert "known tasks: sciq, sciq_think," in message
    assert "(did you mean samsum?)" in task_error("samsun")
    assert "(did you mean imdb_sentiment?)" in task_error("imdb")
    assert "(did you mean mlqa?)" in task_error("mlqa_hi_en")
    assert "did you mean" not in task_error("xyz")
    assert task_error(None).startswith("data.task: unknown task None")


def test_unknown_option_lists_the_known_ones():
    assert task_error("sciq", {"include_suport": False}) == (
        "data.task_options.include_suport: unknown option (did you mean include_support?); known: include_support, seed"
    )
    assert (
        task_error("samsum", {"seed": 1})
        == "data.task_options.seed: unknown option; task samsum takes no options"
    )


def test_option_of_the_wrong_type():
    assert task_error("sciq", {"include_support": "no"}) == (
        "data.task_options.include_support: expected a boolean (true or false), got str 'no'"
    )
    assert task_error("sciq_think", {"include_support": 1}).startswith(
        "data.task_options.include_support: expected a boolean"
    )
    assert task_error("sciq", {"seed": True}) == "data.task_options.seed: expected an integer, got bool True"
    assert task_error("sciq", {"seed": 1.5}) == "data.task_options.seed: expected an integer, got float 1.5"
    assert task_error("sciq", ["seed"]).startswith("data.task_options: expected a mapping")


@pytest.mark.parametrize(
    ("options", "key", "words"),
    [
        ({"target": "{a}"}, "source", "required by the template task"),
        ({"source": "{a}"}, "target", "required by the template task"),
        ({"source": 3, "target": "{a}"}, "source", "expected a format string, got int 3"),
        ({"source": "{a", "target": "{b}"}, "source", "not a valid format string"),
        ({"source": "{}", "target": "{b}"}, "source", "positional"),
        ({"source": "{a}", "target": "{0}"}, "target", "positional"),
        ({"source": "{a}", "target": "fixed"}, "target", "names no column"),
        ({"source": "{a:{w}}", "target": "{b}"}, "source", "nested fields"),
        (
            {"source": "{a}", "target": "{b}", "metrics": ["acc"]},
            "metrics",
            "unknown metric 'acc' (did you mean accuracy?)",
        ),
        ({"source": "{a}", "target": "{b}", "metrics": []}, "metrics", "non-empty list"),
        ({"source": "{a}", "target": "{b}", "metrics": "rouge"}, "metrics", "non-empty list"),
        ({"source": "{a}", "target": "{b}", "labels": "yes"}, "labels", "list of non-empty strings or null"),
        (
            {"source": "{a}", "target": "{b}", "labels": ["yes", ""]},
            "labels",
            "list of non-empty strings or null",
        ),
        (
            {"source": "{a}", "target": "{b}", "label": ["yes"]},
            "label",
            "unknown option (did you mean labels?)",
        ),
    ],
)
def test_template_option_errors(options, key, words):
    message = task_error("template", options)
    assert message.startswith(f"data.task_options.{key}: ") and words in message


# ----------------------------------------------------------------------------------------------
# Sample files under examples/data: public schemas, every row formats with every task that uses it

FILE_TASKS = {
    "squad.jsonl": ["squad_qa", "squad_qg"],
    "samsum.jsonl": ["samsum"],
    "imdb.jsonl": ["imdb_sentiment"],
    "emotion.jsonl": ["emotion"],
    "paws.jsonl": ["paws_paraphrase", "paws_similarity"],
    "mlqa_hi_en.jsonl": ["mlqa"],
    "wmt16_de_en.jsonl": ["wmt16_en_de"],
    "openorca.jsonl": ["openorca"],
    "hc3.jsonl": ["hc3"],
}


def read_jsonl(name: str) -> list[dict]:
    lines = (EXAMPLES / name).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_every_sample_file_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.jsonl")) == sorted(FILE_TASKS)


@pytest.mark.parametrize("name", FILE_TASKS)
def test_sample_file_formats_with_its_tasks(name):
    rows = read_jsonl(name)
    assert 12 <= len(rows) <= 20
    for task_name in FILE_TASKS[name]:
        task = build_task(task_name)
        assert set(task.columns) <= set(rows[0]), task_name
        examples = [task.format(row) for row in rows]
        kept = [e for e in examples if e is not None]
        assert kept, task_name
        if task.labels:
            assert {e.target for e in kept} == set(task.labels)
        if task.answer_prefix:
            assert all(e.target.startswith(task.answer_prefix) for e in kept)


def test_sample_files_keep_their_public_schema():
    keys = {
        "squad.jsonl": {"id", "title", "context", "question", "answers"},
        "mlqa_hi_en.jsonl": {"id", "title", "context", "question", "answers"},
        "samsum.jsonl": {"id", "dialogue", "summary"},
        "imdb.jsonl": {"text", "label"},
        "emotion.jsonl": {"text", "label"},
        "paws.jsonl": {"id", "sentence1", "sentence2", "label"},
        "wmt16_de_en.jsonl": {"translation"},
        "openorca.jsonl": {"id", "system_prompt", "question", "response"},
        "hc3.jsonl": {"id", "question", "human_answers", "chatgpt_answers", "source"},
    }
    for name, expected in keys.items():
        for row in read_jsonl(name):
            assert set(row) == expected, name
    assert {row["label"] for row in read_jsonl("paws.jsonl")} == {0, 1}
    assert {row["label"] for row in read_jsonl("emotion.jsonl")} == set(range(6))
    assert {row["label"] for row in read_jsonl("imdb.jsonl")} == {0, 1}
    assert all(set(row["translation"]) == {"de", "en"} for row in read_jsonl("wmt16_de_en.jsonl"))
    assert any(row["system_prompt"] == "" for row in read_jsonl("openorca.jsonl"))


@pytest.mark.parametrize("name", ["squad.jsonl", "mlqa_hi_en.jsonl"])
def test_answer_start_offsets_are_right(name):
    for row in read_jsonl(name):
        answers = row["answers"]
        assert len(answers["text"]) == len(answers["answer_start"]) >= 1
        for text, start in zip(answers["text"], answers["answer_start"], strict=True):
            assert row["context"][start : start + len(text)] == text, (row["id"], text)


def test_mlqa_sample_has_hindi_context_and_english_question():
    devanagari = re.compile("[\u0900-\u097f]")
    for row in read_jsonl("mlqa_hi_en.jsonl"):
        assert devanagari.search(row["context"]) and row["question"].isascii()


def test_offline_template_recipe_options_format_the_squad_sample():
    recipe = load_recipe(ROOT / "recipes" / "offline" / "template-lora.yaml")
    task = build_task("template", recipe.data.task_options)
    for row in read_jsonl("squad.jsonl"):
        assert task.format(row).target == row["answers"]["text"][0]
