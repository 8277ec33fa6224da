"""The shape of the code: commands are peers over shared pieces, and nothing imports in a circle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "flantune"
COMMANDS = {"train", "rl", "evaluate", "generate", "serve", "export"}
"""One module per command; `quickstart` runs the others (its point) and `cli` dispatches to them."""


def imports() -> dict[str, set[str]]:
    """flantune module -> the flantune modules it imports, at the top or inside functions."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flantune"):
                if node.module == "flantune":  # from flantune import checkpoint as ckpt
                    found |= {alias.name for alias in node.names}
                else:
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("flantune.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_commands_never_import_commands():
    graph = imports()
    assert set(graph) >= COMMANDS
    for command in COMMANDS:
        assert not graph[command] & COMMANDS, (command, graph[command] & COMMANDS)


def test_no_module_imports_itself_through_others():
    graph = imports()

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = {m for m in graph if m in reaches(m)}
    assert not cycles, cycles


def test_every_module_says_its_role_on_its_first_line():
    for path in PACKAGE.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, path.name


def test_the_cli_and_the_metrics_load_no_heavy_library_at_import():
    """Every command starts by importing the CLI, which decorates each command with the user-error
    handler: that import loads none of torch, transformers, peft, accelerate, datasets, rouge_score
    (nltk, scipy) — the errors it catches live in flantune.errors. flantune.metrics (imported by
    training's scoring) loads rouge_score only when a ROUGE score is computed: ~2 s of every
    training run's start otherwise."""
    import subprocess
    import sys

    heavy = ("torch", "transformers", "peft", "accelerate", "datasets", "rouge_score", "nltk", "scipy")
    probe = ("import sys, {module}; print(','.join(m for m in {heavy!r} if m in sys.modules))")
    for module in ("flantune.cli", "flantune.metrics"):
        code = probe.format(module=module, heavy=heavy)
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        assert loaded == "", (module, loaded)
