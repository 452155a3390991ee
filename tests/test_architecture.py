"""The code's shape, measured on the checkout: short functions and modules, no import circles, public modules that
declare what they export. These are the limits docs/architecture.md and docs/writing-a-rule.md promise a newcomer."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fxsurgery"
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8
MAX_MODULE_LINES = 400
#: The public entry points (``fxsurgery.__all__``) take the options users pass by keyword, and document them: the
#: limits on length and parameters are for the code behind them.
PUBLIC = {"rewrite", "linear_to_conv", "conv_to_linear", "check", "benchmark", "validate", "cross_check"}
#: Functions rewritten graphs call: their signature is the call the graph makes, kept so that saved graphs still run.
GRAPH_CALLED = "fxsurgery._runtime"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _runtime_imports(name: str, path: Path) -> set[str]:
    """The fxsurgery modules ``name`` imports when it runs (``if TYPE_CHECKING:`` blocks aside), resolved to the
    most specific module (``from fxsurgery.rules import conv_to_linear`` is the module ``...conv_to_linear``)."""
    tree = ast.parse(path.read_text())
    ifs = [node for node in ast.walk(tree) if isinstance(node, ast.If)]
    guarded = [node for node in ifs if "TYPE_CHECKING" in ast.unparse(node.test)]
    checking = {id(n) for node in guarded for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fxsurgery")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxsurgery"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found - {name}


def _cycle() -> list[str] | None:
    graph = {name: _runtime_imports(name, path) & MODULES.keys() for name, path in MODULES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle():
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("from fxsurgery.b import x\n")
    (tmp_path / "b.py").write_text("import fxsurgery.a\nif TYPE_CHECKING:\n    from fxsurgery.c import y\n")
    (tmp_path / "c.py").write_text("from fxsurgery.a import z\n")
    fake = {"fxsurgery.a": tmp_path / "a.py", "fxsurgery.b": tmp_path / "b.py", "fxsurgery.c": tmp_path / "c.py"}
    monkeypatch.setattr(f"{__name__}.MODULES", fake)
    assert _cycle() == ["fxsurgery.a", "fxsurgery.b", "fxsurgery.a"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size_and_function_length(name):
    path = MODULES[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path} has {len(text.splitlines())} lines"
    # whole definitions, signature and docstring included
    functions = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    functions = [n for n in functions if n.name not in PUBLIC]
    long = [
        f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in functions
        if n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path}: function bodies over {MAX_FUNCTION_LINES} lines: {long}"
    many = [f"{n.name} ({_parameters(n)})" for n in functions if _parameters(n) > MAX_PARAMETERS]
    assert name == GRAPH_CALLED or not many, f"{path}: functions with over {MAX_PARAMETERS} parameters: {many}"


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + [x.arg for x in (a.vararg, a.kwarg) if x]
    return len([n for n in names if n not in ("self", "cls")])


def test_the_package_is_formatted():
    """``ruff format`` (the CI runs it in check mode) leaves the package as it is, with no ``fmt: skip`` markers."""
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed: pip install -e '.[test]'")
    done = subprocess.run([ruff, "format", "--check", "--quiet", str(PACKAGE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    marked = [str(p) for p in PACKAGE.rglob("*.py") if "fmt: skip" in p.read_text() or "fmt: off" in p.read_text()]
    assert not marked, marked


@pytest.mark.parametrize("name", [n for n in sorted(MODULES) if not n.split(".")[-1].startswith("_")])
def test_public_modules_declare_all(name):
    tree = ast.parse(MODULES[name].read_text())
    names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    names |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    assert "__all__" in names or name.endswith("__main__"), f"{name} has no __all__"


#: The package root holds the public face only; the work lives in one folder per stage (capture, rules, plan, engine,
#: verify, artifacts, runtimes) and the command line in cli/.
MAX_ROOT_MODULES = 8
STAGES = {"capture", "rules", "plan", "engine", "verify", "artifacts", "runtimes", "cli"}


def test_the_package_root_holds_the_public_face_and_one_folder_per_stage():
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert len(root) <= MAX_ROOT_MODULES, f"{len(root)} modules at the package root: {root}"
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert folders == STAGES, f"folders {sorted(folders)}, stages {sorted(STAGES)}"


def test_third_party_loggers_are_quieted_for_a_step_only():
    import logging

    from fxsurgery.errors import quiet_loggers

    child = logging.getLogger("torch.onnx._internal.some_step")
    child.setLevel(logging.DEBUG)
    other = logging.getLogger("torchvision")
    with quiet_loggers("torch.onnx"):
        assert logging.getLogger("torch.onnx").level == logging.ERROR and child.level == logging.ERROR
        assert other.level == logging.NOTSET
    assert child.level == logging.DEBUG and logging.getLogger("torch.onnx").level == logging.NOTSET
    levels = {n: logging.getLogger(n).level for n in ("torch.onnx", "coremltools")}
    # library code leaves the process's loggers as it found them (the command line owns its process: it may set them)
    setting = [p for p in PACKAGE.rglob("*.py") if "setLevel" in p.read_text() and p.parent.name != "cli"]
    assert setting == [PACKAGE / "errors.py"], f"logger levels set outside quiet_loggers: {setting}"
    assert levels == {n: logging.getLogger(n).level for n in levels}


def test_no_pattern_name_is_written_outside_the_rules():
    """What a pattern is called is its rule's business: planners, targets and reports read it from the rules (a new
    rule needs no edit elsewhere)."""
    from fxsurgery.rules import conv_to_linear, linear_to_conv

    patterns = {
        r.pattern for rs in (linear_to_conv.rule_set("spatial", True), conv_to_linear.rule_set()) for r in rs.rules
    }
    assert len(patterns) >= 12, patterns
    found = []
    for path in PACKAGE.rglob("*.py"):
        if (PACKAGE / "rules") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in patterns:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_rules_see_the_pass_through_the_narrow_context_only():
    """Rules and propagators are typed against ``RuleContext`` (what they may read and do), never the rewriter
    itself: mypy, which the test command runs, then holds them to it."""
    reaching = []
    for path in (PACKAGE / "rules").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "fxsurgery.engine.rewriter":
                reaching.append(str(path.relative_to(PACKAGE)))
            if isinstance(node, ast.Attribute) and node.attr == "rules" and ast.unparse(node.value) == "rw":
                reaching.append(f"{path.relative_to(PACKAGE)}:{node.lineno} rw.rules")
    assert not reaching, reaching


def test_every_module_imports_on_its_own():
    """``import fxsurgery`` imports nothing (its names load on first use), so every module is an entry point: each is
    imported first in turn, fxsurgery's modules forgotten in between (an import cycle shows only in some orders)."""
    script = """
import importlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
failed = []
for path in sorted(root.rglob("*.py")):
    name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
    if name.endswith("__main__"):
        continue
    for loaded in [m for m in sys.modules if m == "fxsurgery" or m.startswith("fxsurgery.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(PACKAGE)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_the_command_line_parser_imports_no_torch():
    """``fxsurgery --help`` builds the parser without importing torch (it answers in a fraction of a second)."""
    script = "import sys, fxsurgery.cli.parser as p; p.build_parser().format_help(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr
