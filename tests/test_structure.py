"""The layout is a map: one folder per concern, imports only downward, small modules and
functions, each package saying what it owns, and a trainer that knows nothing of Optuna or
MLflow."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# low to high: a module imports from its own layer or lower ones only
LAYERS = [{"errors", "defaults", "logs", "optuna_seam"}, {"inputs"}, {"tracking"}, {"study"}, {"ui"},
          {"worker"}, {"launch"}, {"cli"}, {"__main__"}]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = path
    return out


def imports(path: Path) -> set[str]:
    """Every module an import statement names, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def layer(module: str) -> int:
    top = module.split(".")[1] if module.count(".") else "__init__"
    return next(i for i, names in enumerate(LAYERS) if top in names) if top != "__init__" else -1


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    """No import cycle in `graph` (module -> the modules it imports)."""
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        assert m not in path, f"import cycle: {' -> '.join([*path, m])}"
        if m in done:
            return
        for i in sorted(graph[m]):
            visit(i, [*path, m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_search_imports_only_downward_and_has_no_cycles():
    mods = modules("search")
    graph = {m: {i for i in imports(p) if i in mods and i != "search"} for m, p in mods.items()}
    upward = [f"{m} imports {i}" for m, targets in graph.items() for i in targets
              if layer(i) > layer(m)]
    assert not upward, upward
    # a package's __init__ re-exports its modules: importing it is not a cycle through them
    assert_acyclic({m: {i for i in targets if mods[i].name != "__init__.py"} for m, targets in graph.items()})


def test_the_trainer_has_no_import_cycles():
    """Function-level imports included: a cycle hidden inside a function is still a cycle."""
    mods = modules("trainer")
    assert_acyclic({m: {i for i in imports(p) if i in mods and i not in ("trainer", m)}
                    for m, p in mods.items()})


def test_modules_and_functions_are_small():
    big, long = [], []
    for package in ("search", "trainer"):
        for m, path in modules(package).items():
            lines = path.read_text().splitlines()
            if len(lines) > MAX_MODULE_LINES:
                big.append(f"{m}: {len(lines)} lines")
            for node in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{m}.{node.name}: {n} lines")
    assert not big and not long, big + long


def test_every_package_says_what_it_owns():
    for package in ("search", "trainer"):
        for init in (ROOT / package).rglob("__init__.py"):
            doc = ast.get_docstring(ast.parse(init.read_text()))
            assert doc and len(doc) > 80, f"{init.relative_to(ROOT)} has no docstring"


def test_the_trainer_never_imports_optuna_or_mlflow_or_search():
    for m, path in modules("trainer").items():
        bad = {i for i in imports(path) if i.split(".")[0] in ("optuna", "mlflow", "search")}
        assert not bad, f"{m} imports {sorted(bad)}"


def test_help_and_a_bad_flag_answer_without_importing_torch_or_mlflow():
    """`search --help` and the one line for a bad flag come at once (under a second, not the
    5-15 s that importing torch, MLflow and scikit-learn takes): only a command that trains,
    tracks or loads data imports them."""
    import subprocess
    import sys

    script = ("import sys\nfrom search.cli import main\n"
              "for argv in (['--help'], ['run', '--help'], ['run', '--space', 'nope.yaml']):\n"
              "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
              "print('HEAVY', sorted(m for m in ('torch', 'mlflow', 'sklearn') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert "search run: error: nope.yaml" in out.stderr, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout[-2000:]


def _private_uses(path: Path) -> list[str]:
    """Names another package keeps private, as this module uses them: `x._name` on anything but
    self, cls or super(); `getattr(x, "_name")` and its kin; an import of a private module or
    name of Optuna's or optuna-dashboard's."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            own = (isinstance(base, ast.Name) and base.id in ("self", "cls")) or (
                isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super")
            if not own:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                "optuna", "optuna_dashboard"):
            names = node.module.split(".") + [a.name for a in node.names]
            if any(n.startswith("_") for n in names):
                found.append(f"{node.lineno}: from {node.module} import ...")
    return found


def test_private_names_of_optuna_live_only_in_the_seam():
    """A release of Optuna or optuna-dashboard may move any private name: each use is in
    search/optuna_seam/, where tests/test_optuna_seam.py names the one that moved."""
    uses = [f"{m} {use}" for m, path in modules("search").items()
            if not m.startswith("search.optuna_seam") for use in _private_uses(path)]
    assert not uses, uses


def test_only_the_launchers_name_slurm():
    """A launcher brings its flags, study-file block, task identity, status fields and files:
    outside search/launch/ no name and no string names Slurm (docstrings and comments may)."""
    found = []
    for m, path in modules("search").items():
        if m.startswith("search.launch"):
            continue
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            text = (node.value if isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docs else node.id if isinstance(node, ast.Name)
                    else node.attr if isinstance(node, ast.Attribute) else "")
            if "slurm" in text.lower():
                found.append(f"{m}:{node.lineno}: {text[:60]!r}")
    assert not found, found
