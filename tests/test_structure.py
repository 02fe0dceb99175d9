"""The source tree's shape, read with ``ast``: no import cycle among mslora's modules (imports inside functions
included), no private name imported across modules, ``__init__.py`` files that only re-export, functions that read
in one screen, and a ``--help`` that documents every option with the default a run uses."""
import ast
import dataclasses
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "mslora"
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def imports(name: str) -> set[str]:
    """mslora modules that ``name`` imports anywhere in its file (``from pkg import mod`` counts as ``pkg.mod``)."""
    found = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in MODULES else node.module)
    return {m for m in found if m == "mslora" or m.startswith("mslora.")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_the_module_import_graph_has_no_cycle():
    graph = {name: imports(name) - {name} for name in MODULES}
    assert graph["mslora.core.adapt"] and graph["mslora.engine.loop"]  # the graph is read, not empty
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # and the check can fail: a cycle put into a copy of the graph is found
    assert find_cycle({**graph, "mslora.registry": graph["mslora.registry"] | {"mslora.core.adapt"}})


def test_no_module_imports_the_package_itself_or_a_private_name():
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mslora"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{name} imports {private} from {node.module}"
                roots = [a.name for a in node.names if node.module == "mslora" and f"mslora.{a.name}" not in MODULES]
                assert not roots, f"{name} imports {roots} from the package root (import the defining module)"
            if isinstance(node, ast.Import):
                assert all(a.name != "mslora" for a in node.names), f"{name} imports the package root"


def test_init_files_hold_only_docstrings_and_re_exports():
    for name, tree in TREES.items():
        if MODULES[name].name != "__init__.py":
            continue
        for node in tree.body:
            ok = isinstance(node, (ast.Import, ast.ImportFrom)) or (
                isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) or (
                isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"])
            assert ok, f"{MODULES[name]}:{node.lineno} holds code ({type(node).__name__})"


def test_every_function_reads_in_one_screen():
    lengths = {f"{name}.{node.name}:{node.lineno}": node.end_lineno - node.lineno + 1
               for name, tree in TREES.items() for node in ast.walk(tree)
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    longest = max(lengths, key=lengths.get)
    assert lengths[longest] < MAX_FUNCTION_LINES, f"{longest} has {lengths[longest]} lines"


@pytest.mark.parametrize("method", ["mslora", "lora", "rlrr", "colora"])
def test_train_help_documents_every_option_with_the_default_used(method):
    from mslora.engine.config import MAIN_JOB_METHOD, MAIN_JOB_METHOD_OPTIONS, TASK_DEFAULTS, train_parser
    from mslora.registry import get_method

    parser = train_parser(method, main_job_options=method == MAIN_JOB_METHOD)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(get_method(method).config_cls)}
    assert fields <= set(actions)
    for dest, action in actions.items():
        assert action.help and not action.help.startswith(" (default"), f"--{dest} has no help"
    assert "(default: classify 20, detect 5, segment 6)" in actions["epochs"].help
    assert f"(default: classify {TASK_DEFAULTS['classify']['lr']}, detect" in actions["lr"].help
    if method == MAIN_JOB_METHOD:
        assert f"(default: {MAIN_JOB_METHOD_OPTIONS['rank']} (the main job's))" in actions["rank"].help
        assert "recompute each module's activations" in actions["grad_checkpointing"].help
    elif "rank" in fields:
        default = next(f.default for f in dataclasses.fields(get_method(method).config_cls) if f.name == "rank")
        assert actions["rank"].help.endswith(f"(default: {default})")


def test_readme_keeps_every_section_and_names_only_files_that_exist():
    """The README is the user's manual: a bad edit once cut it to two sections, and no test noticed."""
    import re

    root = SRC.parent
    text = (root / "README.md").read_text()
    sections = re.findall(r"^##+ (.+)$", text, re.M)
    for needed in ("The two commands", "The main job", "Python", "Use a trained adapter", "Serve",
                   "Every method on the same real task", "Dense tasks: detection, instance and semantic segmentation",
                   "Speed and memory", "Command line", "Architecture"):
        assert needed in sections, f"README lost its section '{needed}'"
    for path in sorted(set(re.findall(r"`((?:benchmarks|configs|scripts|src|tests)/[\w./-]+\.\w+)`", text))):
        assert (root / path).exists(), f"README names {path}, which does not exist"
