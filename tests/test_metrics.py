"""Metrics checked against hand arithmetic and the libraries' documented examples."""

import pytest

from flantune.metrics import (
    METRIC_NAMES,
    compute_metrics,
    extract_answer,
    is_well_formed,
    normalize_answer,
    row_scores,
)

# --- ROUGE ----------------------------------------------------------------------------------------


def test_rouge_identical_is_100():
    text = "The quick brown fox jumps over the lazy dog. It was not amused."
    scores = compute_metrics(["rouge"], [text], [[text]])
    assert scores == pytest.approx({"rouge1": 100, "rouge2": 100, "rougeL": 100, "rougeLsum": 100})


def test_rouge_hand_computed():
    # ref  "the cat sat on the mat"        6 tokens, 5 bigrams
    # pred "the cat lay on the mat today"  7 tokens, 6 bigrams
    # ROUGE-1: overlap the×2, cat, on, mat = 5 → P 5/7, R 5/6, F = 2·(5/7)(5/6)/((5/7)+(5/6)) = 10/13
    # ROUGE-2: overlap the-cat, on-the, the-mat = 3 → P 3/6, R 3/5, F = 2·0.5·0.6/1.1 = 6/11
    # ROUGE-L: LCS "the cat on the mat" = 5 → same P/R as ROUGE-1 → 10/13
    scores = compute_metrics(["rouge"], ["the cat lay on the mat today"], [["the cat sat on the mat"]])
    assert scores["rouge1"] == pytest.approx(100 * 10 / 13)
    assert scores["rouge2"] == pytest.approx(100 * 6 / 11)
    assert scores["rougeL"] == pytest.approx(100 * 10 / 13)
    assert scores["rougeLsum"] == pytest.approx(100 * 10 / 13)  # one sentence: same as rougeL


def test_rouge_uses_stemmer():
    # Porter stems "running" to "run"; without stemming the two share no token.
    assert compute_metrics(["rouge"], ["running"], [["run"]])["rouge1"] == pytest.approx(100)


def test_rouge_lsum_is_sentence_level():
    # Same two sentences in the opposite order. rougeL takes one LCS over the whole text:
    # "the cat sat" (or "the dog ran") = 3 of 6 tokens → 50. rougeLsum unions per-sentence LCSs:
    # each reference sentence is matched in full by some predicted sentence → 6/6 → 100.
    scores = compute_metrics(["rouge"], ["the dog ran. the cat sat."], [["the cat sat. the dog ran."]])
    assert scores["rougeL"] == pytest.approx(50)
    assert scores["rougeLsum"] == pytest.approx(100)


def test_rouge_takes_best_reference():
    scores = compute_metrics(["rouge"], ["the cat sat"], [["a dog barked", "the cat sat"]])
    assert scores["rougeL"] == pytest.approx(100)


def test_rouge_warns_on_text_its_tokenizer_drops():
    with pytest.warns(UserWarning, match="non-Latin"):
        compute_metrics(["rouge"], ["नमस्ते दुनिया"], [["नमस्ते दुनिया"]])


# --- BLEU / chrF ----------------------------------------------------------------------------------

# sacrebleu README: refs are given there as two reference streams; ours are per row.
SACRE_HYPS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
SACRE_STREAMS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]
SACRE_ROWS = [list(row) for row in zip(*SACRE_STREAMS, strict=True)]


def test_bleu_chrf_identical_is_100():
    hyps = ["The dog bit the man.", "It was not unexpected."]
    scores = compute_metrics(["bleu", "chrf"], hyps, [[h] for h in hyps])
    assert scores == pytest.approx({"bleu": 100, "chrf": 100})


def test_bleu_chrf_match_sacrebleu_readme():
    # README: "BLEU = 48.53 82.4/50.0/45.5/37.5 ..." and "chrF2 = 59.73".
    scores = compute_metrics(["bleu", "chrf"], SACRE_HYPS, SACRE_ROWS)
    assert scores["bleu"] == pytest.approx(48.53, abs=0.005)
    assert scores["chrf"] == pytest.approx(59.73, abs=0.005)


def test_bleu_variable_references_match_sacrebleu_readme():
    # README "Variable Number of References": first sentence keeps only its second reference → 29.44.
    rows = [["The dog had bit the man."], SACRE_ROWS[1], SACRE_ROWS[2]]
    assert compute_metrics(["bleu"], SACRE_HYPS, rows)["bleu"] == pytest.approx(29.44, abs=0.005)


def test_more_references_raise_bleu_and_chrf():
    single = compute_metrics(["bleu", "chrf"], SACRE_HYPS, [[row[0]] for row in SACRE_ROWS])
    multi = compute_metrics(["bleu", "chrf"], SACRE_HYPS, SACRE_ROWS)
    assert multi["bleu"] > single["bleu"]
    assert multi["chrf"] > single["chrf"]


# --- SQuAD EM / F1 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat!", "cat"),
        ("  An   apple, a day ", "apple day"),
        ("theater", "theater"),  # articles only as whole words
        ("Hello,\tWorld.", "hello world"),
        ("well-known", "wellknown"),  # punctuation is removed, not replaced by a space
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_squad_hand_computed():
    # pred "the cat sat" → [cat, sat]; ref "a cat sat on the mat" → [cat, sat, on, mat]
    # common 2 → P 2/2, R 2/4 → F1 = 2·1·0.5/1.5 = 2/3; not an exact match.
    scores = compute_metrics(["exact_match", "f1"], ["the cat sat"], [["a cat sat on the mat"]])
    assert scores["exact_match"] == 0
    assert scores["f1"] == pytest.approx(100 * 2 / 3)


def test_squad_exact_match_after_normalization():
    scores = compute_metrics(["exact_match", "f1"], ["The Eiffel Tower!"], [["eiffel tower"]])
    assert scores == pytest.approx({"exact_match": 100, "f1": 100})


def test_squad_max_over_references():
    # Row 1: second reference matches exactly. Row 2: F1 vs "blue sky" = 2·(1/1)(1/2)/1.5 = 2/3, vs
    # "red" = 0 → 2/3. Means: EM (100 + 0)/2 = 50, F1 (100 + 66.67)/2 = 83.33.
    scores = compute_metrics(
        ["exact_match", "f1"],
        ["the cat sat", "blue"],
        [["a cat sat on the mat", "The cat sat."], ["red", "blue sky"]],
    )
    assert scores["exact_match"] == pytest.approx(50)
    assert scores["f1"] == pytest.approx((100 + 100 * 2 / 3) / 2)


def test_squad_no_overlap_is_zero():
    assert compute_metrics(["f1"], ["dog"], [["cat"]])["f1"] == 0


# --- accuracy / macro-F1 --------------------------------------------------------------------------

GOLD = ["pos", "pos", "pos", "neg", "neg", "neu"]
PRED = ["pos", "pos", "neg", "neg", "neu", "maybe"]  # "maybe" is outside the label set
# pos: TP 2, FP 0, FN 1 → F1 = 2·2/(2·2+0+1) = 4/5
# neg: TP 1, FP 1 (row 3), FN 1 (row 5) → 2/4 = 1/2
# neu: TP 0, FP 1 (row 5), FN 1 (row 6, "maybe") → 0
# macro = (0.8 + 0.5 + 0)/3 = 0.4333; a 4th class "maybe" would have given 1.3/4 = 0.325.
MACRO = 100 * (0.8 + 0.5 + 0) / 3


def test_accuracy():
    # 3 of 6 right; surrounding whitespace does not count.
    preds = [" pos", "pos\n", *PRED[2:]]
    assert compute_metrics(["accuracy"], preds, [[g] for g in GOLD])["accuracy"] == pytest.approx(50)


def test_accuracy_uses_main_reference_only():
    assert compute_metrics(["accuracy"], ["b"], [["a", "b"]])["accuracy"] == 0


def test_macro_f1_hand_computed():
    refs = [[g] for g in GOLD]
    assert compute_metrics(["macro_f1"], PRED, refs)["macro_f1"] == pytest.approx(MACRO)
    given = compute_metrics(["macro_f1"], PRED, refs, labels=["neg", "neu", "pos"])
    assert given["macro_f1"] == pytest.approx(MACRO)


def test_macro_f1_prediction_outside_labels_is_wrong():
    # All wrong: "maybe" is no class, so "pos" gets FN 2 and F1 0.
    scores = compute_metrics(["macro_f1"], ["maybe", "maybe"], [["pos"], ["pos"]], labels=["pos", "neg"])
    assert scores["macro_f1"] == 0


def test_macro_f1_skips_labels_with_no_support_and_no_prediction():
    # "surprise" neither occurs nor is predicted: F1 is 0/0 and is left out, not averaged in as 0.
    refs = [[g] for g in GOLD]
    scores = compute_metrics(["macro_f1"], PRED, refs, labels=["pos", "neg", "neu", "surprise"])
    assert scores["macro_f1"] == pytest.approx(MACRO)


def test_macro_f1_reference_outside_labels_raises():
    with pytest.raises(ValueError, match="not in the label set"):
        compute_metrics(["macro_f1"], ["pos"], [["joy"]], labels=["pos", "neg"])


# --- multiple choice ------------------------------------------------------------------------------

OPTIONS = ["mitochondria", "nucleus", "ribosome", "cell wall"]


def test_mc_text_match_is_normalized():
    scores = compute_metrics(["mc_accuracy"], ["The Nucleus."], [["nucleus"]], choices=[OPTIONS])
    assert scores["mc_accuracy"] == 100


def test_mc_reads_answer_tag():
    pred = "<think>the nucleus holds the DNA</think> <answer> nucleus </answer>"
    assert compute_metrics(["mc_accuracy"], [pred], [["nucleus"]], choices=[OPTIONS])["mc_accuracy"] == 100
    # Outside the tag only the answer counts: the reasoning naming it is not enough.
    wrong = "<think>not the nucleus</think><answer>ribosome</answer>"
    assert compute_metrics(["mc_accuracy"], [wrong], [["nucleus"]], choices=[OPTIONS])["mc_accuracy"] == 0


def test_mc_reads_a_tagged_reference_by_its_answer():
    """sciq_think's targets carry reasoning and a tagged answer: the answer is what counts."""
    target = "<think> DNA is kept in the nucleus. </think> <answer> nucleus </answer>"
    preds = [target, "<think>other words</think><answer>(B)</answer>", "<answer>ribosome</answer>"]
    scores = compute_metrics(["mc_accuracy"], preds, [[target]] * 3, choices=[OPTIONS] * 3)
    assert scores["mc_accuracy"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("letter", ["B", "(B)", "b)", "b", "<answer>(B)</answer>"])
def test_mc_letter_choice(letter):
    assert compute_metrics(["mc_accuracy"], [letter], [["nucleus"]], choices=[OPTIONS])["mc_accuracy"] == 100


def test_mc_wrong_answers():
    preds = ["ribosome", "(C)", "E", "B"]
    refs = [["nucleus"]] * 4
    # "E" is beyond the four options; "B" without choices cannot be resolved.
    choices = [OPTIONS, OPTIONS, OPTIONS, []]
    assert compute_metrics(["mc_accuracy"], preds, refs, choices=choices)["mc_accuracy"] == 0


def test_mc_empty_answer_is_wrong_even_against_letter_reference():
    # normalize_answer("A") is "" (an article): an empty prediction must not match it.
    assert compute_metrics(["mc_accuracy"], ["", "(A)"], [["A"], ["A"]])["mc_accuracy"] == 50


def test_mc_answer_prefix_is_stripped():
    scores = compute_metrics(
        ["mc_accuracy"],
        ["answer: nucleus"],
        [["answer: nucleus"]],
        choices=[OPTIONS],
        answer_prefix="answer: ",
    )
    assert scores["mc_accuracy"] == 100
    # A letter only reads as a letter once the prefix is gone.
    scores = compute_metrics(
        ["mc_accuracy"], ["answer: (B)"], [["nucleus"]], choices=[OPTIONS], answer_prefix="answer: "
    )
    assert scores["mc_accuracy"] == 100


def test_answer_prefix_applies_to_other_metrics():
    scores = compute_metrics(
        ["exact_match"], ["german: Hallo Welt"], [["Hallo Welt"]], answer_prefix="german: "
    )
    assert scores["exact_match"] == 100
    # Without stripping, "german" is an extra token: F1 = 2·(2/3)(1)/(5/3) = 0.8.
    assert compute_metrics(["f1"], ["german: Hallo Welt"], [["Hallo Welt"]])["f1"] == pytest.approx(80)


def test_extract_answer():
    assert extract_answer("<think>x</think><answer> 42 </answer>") == "42"
    assert extract_answer("<answer>first</answer><answer>second</answer>") == "first"
    assert extract_answer("  just text ") == "just text"
    assert extract_answer("<answer>unclosed") == "<answer>unclosed"


# --- format rate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("<think>reason</think><answer>42</answer>", True),
        ("  <think>\nreason\n</think>\n<answer> 42 </answer>\n", True),
        ("<think>reason</think>", False),  # missing answer
        ("<answer>42</answer><think>reason</think>", False),  # wrong order
        ("<think> </think><answer>42</answer>", False),  # empty think
        ("<think>reason</think><answer></answer>", False),  # empty answer
        ("So: <think>reason</think><answer>42</answer>", False),  # text before
        ("<think>reason</think><answer>42</answer> done", False),  # text after
        ("<think>r</think><answer>1</answer><answer>2</answer>", False),  # a second answer block
    ],
)
def test_is_well_formed(text, ok):
    assert is_well_formed(text) is ok


def test_format_rate():
    preds = [
        "<think>a</think><answer>b</answer>",
        "<answer>b</answer>",
        "b",
        "<think>a</think> <answer>b</answer>",
    ]
    assert compute_metrics(["format_rate"], preds, [["b"]] * 4)["format_rate"] == pytest.approx(50)


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_metric_lists_known_ones():
    with pytest.raises(ValueError, match="meteor") as err:
        compute_metrics(["rouge", "meteor"], ["a"], [["a"]])
    assert all(name in str(err.value) for name in METRIC_NAMES)


def test_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1"):
        compute_metrics(["accuracy"], ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="choices"):
        compute_metrics(["mc_accuracy"], ["a"], [["a"]], choices=[OPTIONS, OPTIONS])


def test_empty_input():
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics(["rouge"], [], [])
    with pytest.raises(ValueError, match="no predictions"):
        row_scores(["rouge"], [], [])


def test_malformed_references():
    with pytest.raises(ValueError, match="list of strings per row"):
        compute_metrics(["accuracy"], ["a"], ["a"])
    with pytest.raises(ValueError, match="at least one reference"):
        compute_metrics(["accuracy"], ["a"], [[]])


def test_single_name_string_is_one_metric():
    assert compute_metrics("accuracy", ["a"], [["a"]]) == {"accuracy": 100}


# --- row scores -----------------------------------------------------------------------------------


def test_row_scores_means_equal_corpus_scores():
    preds = [
        "the cat sat on the mat. it was happy.",
        "<think>hmm</think><answer>(B)</answer>",
        "a dog",
        "nucleus",
    ]
    refs = [
        ["the cat sat on a mat. it purred.", "a cat was on the mat."],
        ["nucleus"],
        ["the dog"],
        ["ribosome"],
    ]
    choices = [[], OPTIONS, [], OPTIONS]
    decomposable = ["rouge", "exact_match", "f1", "accuracy", "mc_accuracy", "format_rate"]

    corpus = compute_metrics(decomposable, preds, refs, choices=choices)
    rows = row_scores(METRIC_NAMES, preds, refs, choices=choices)

    assert len(rows) == len(preds)
    for key in ["rougeL", "exact_match", "f1", "accuracy", "mc_accuracy", "format_rate"]:
        assert sum(row[key] for row in rows) / len(rows) == pytest.approx(corpus[key]), key
    assert all({"bleu", "chrf"} <= row.keys() and "macro_f1" not in row for row in rows)
    assert [row["mc_accuracy"] for row in rows] == [0, 100, 100, 0]  # "a dog" ~ "the dog"
    assert [row["format_rate"] for row in rows] == [0, 100, 0, 0]


def test_row_scores_identical_rows_are_100():
    rows = row_scores(["bleu", "chrf"], ["The dog bit the man."], [["The dog bit the man."]])
    assert rows[0] == pytest.approx({"bleu": 100, "chrf": 100})
