"""The report's figures: confusion counts against counts made independently, and no global matplotlib state."""

import json
from collections import Counter

from flantune.figures import LabelRows, confusion, draw_report
from flantune.metrics import row_scores
from flantune.tasks import build_task

from .conftest import SCIQ, need


def test_multiple_choice_confusion_counts_the_option_each_answer_names():
    """SciQ rows with answers written every way mc_accuracy reads them (option text, a bare letter,
    tagged), wrong options, and answers that name no option; counts by option position."""
    need(SCIQ)
    task = build_task("sciq")
    examples = [task.format(row) for row in json.loads(SCIQ.read_text())[:40]]
    choices = [list(e.choices) for e in examples]
    predictions, expected = [], Counter()
    for i, e in enumerate(examples):
        right = choices[i].index(e.target)
        wrong = (right + 1 + i % 3) % len(choices[i])
        kind = i % 6
        written, named = [
            (e.target, right),  # the option's text
            (f"({'ABCD'[right]})", right),  # its letter
            (f"<think> so </think> <answer> {choices[i][wrong]} </answer>", wrong),
            (f"{'ABCD'[wrong]}.", wrong),
            ("none of these, probably", None),
            ("E", None),  # a letter past the options
        ][kind]
        predictions.append(written)
        expected[right, 4 if named is None else named] += 1
    rows = LabelRows("sciq", list(range(len(examples))), None, choices)
    classes, counts = confusion(rows, predictions, [e.target for e in examples])
    assert classes == ["A", "B", "C", "D"]
    assert counts == [[expected[r, p] for p in range(5)] for r in range(4)]
    # The diagonal is what mc_accuracy counts as right.
    scores = row_scores(["mc_accuracy"], predictions, [[e.target] for e in examples], choices=choices)
    assert sum(counts[k][k] for k in range(4)) == sum(s["mc_accuracy"] == 100 for s in scores)


def test_figures_leave_matplotlib_global_state_alone(tmp_path):
    """Drawn on Figure objects with their own canvas: pyplot's backend and rcParams stay as they were,
    and a figure without its data (no label task, no run log) is left out."""
    import matplotlib

    backend, fonttype = matplotlib.get_backend(), matplotlib.rcParams["svg.fonttype"]
    drawn = draw_report(tmp_path, {"m": {"accuracy": 50.0}}, {"m": ["yes", "maybe"]}, ["yes", "no"], [], {})
    assert [d.name for d in drawn] == ["scores", "lengths"]
    assert matplotlib.get_backend() == backend and matplotlib.rcParams["svg.fonttype"] == fonttype
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure-lengths.png", "figure-scores.png"]
    # A label task: the prediction outside the labels is counted under other/invalid.
    rows = LabelRows("t", [0, 1], ("yes", "no"))
    assert confusion(rows, ["yes", "maybe"], ["yes", "no"]) == (["yes", "no"], [[1, 0, 0], [0, 0, 1]])


def test_many_rows_are_one_image_in_the_lengths_figure(tmp_path):
    """Up to RASTER_POINTS rows each point of the lengths scatter is an SVG element; past it the
    points are one embedded image, so the page does not grow with the rows."""
    from flantune import figures

    sizes = {}
    for n in (figures.RASTER_POINTS, figures.RASTER_POINTS + 1):
        references = [" ".join(["w"] * (1 + i % 7)) for i in range(n)]
        predictions = {"m": [" ".join(["w"] * (1 + i % 5)) for i in range(n)]}
        (drawn,) = [d for d in draw_report(tmp_path, {}, predictions, references, [], {}) if d.name == "lengths"]
        sizes[n] = (drawn.svg.count("<image"), len(drawn.svg))
    small, large = sizes[figures.RASTER_POINTS], sizes[figures.RASTER_POINTS + 1]
    assert small[0] == 0 and large[0] >= 1
    assert large[1] < small[1] / 2
