"""Plain helper functions for the tests (no fixtures: those live in conftest.py).

Keep each helper small, documented and free of side effects; import them with
`from helpers import ...` (pytest puts tests/ on sys.path, as for conftest).

- `dvc_stages`: every stage of a DVC project, `foreach`/`matrix` expanded, as DVC itself resolves them.
- `entry_modules`: the project modules a stage command runs (`-m stages.NAME`, `path/to/script.py`).
- `import_closure`: the project files a set of entry files executes, found with `ast` (nothing is imported).
- `parse`: a file's AST, cached until the file changes.
- `is_inert_init`: whether a package `__init__.py` holds nothing that can change what a stage computes.
- `direct_imports`, `module_file`, `module_name`, `names_read`, `is_docstring`: the small pieces of the above.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path


# ---------------------------------------------------------------- DVC stages

@dataclass(frozen=True)
class StageInfo:
    """One resolved stage: `name` as `dvc repro` takes it from the root (e.g. `train@digit`), its command, its deps.

    `deps` are paths relative to the project root (DVC writes them relative to the stage's wdir), params
    dependencies (params.yaml) excluded.
    """

    name: str
    cmd: str
    deps: tuple[str, ...]


def dvc_stages(root: Path) -> list[StageInfo]:
    """All stages of the DVC project at `root`, in dvc.yaml order, with DVC's own interpolation.

    `${...}` in cmd/deps is resolved against params.yaml and `vars`, and a `foreach`/`matrix` definition
    yields one stage per item (`name@key`), exactly as `dvc repro` would run them. Reads only.
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(root).resolve()
    stages = []
    with Repo(str(root)) as repo:
        for stage in repo.index.stages:
            cmd = stage.cmd if isinstance(stage.cmd, str) else "\n".join(stage.cmd or [])
            wdir = Path(stage.wdir)
            deps = tuple(
                Path(os.path.relpath(wdir / str(dep.def_path), root)).as_posix()
                for dep in stage.deps if not isinstance(dep, ParamsDependency)
            )
            # stage.addressing is relative to the current directory; name it from `root` instead.
            dvcfile = Path(os.path.relpath(stage.dvcfile.path, root)).as_posix()
            name = stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}"
            stages.append(StageInfo(name, cmd, deps))
    return stages


# ---------------------------------------------------------------- modules and files

def module_file(name: str, root: Path) -> Path | None:
    """The file under `root` that `import name` executes last (`a/b.py` or `a/b/__init__.py`), or None."""
    if not all(part.isidentifier() for part in name.split(".")):
        return None
    base = Path(root, *name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path, root: Path) -> str:
    """`digit/x.py` -> `digit.x`; `digit/__init__.py` -> `digit`."""
    parts = list(path.resolve().relative_to(Path(root).resolve()).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _with_parents(name: str, root: Path) -> list[Path]:
    """Every project file `import name` executes: each enclosing package's `__init__.py`, then the module."""
    parts = name.split(".")
    files = []
    for i in range(1, len(parts) + 1):
        found = module_file(".".join(parts[:i]), root)
        if found is None:
            break  # not a project module (stdlib, third party) or a name inside a module
        files.append(found)
    return files


_ENTRY_MODULE = re.compile(r"(?<!\S)(?:-m\s*|--module[=\s]\s*)([A-Za-z_][\w.]*)")
_ENTRY_SCRIPT = re.compile(r"(?<!\S)([\w./-]+\.py)(?!\S)")


def entry_modules(cmd: str, root: Path) -> list[Path]:
    """The project files a stage command starts, in order: `-m pkg.mod` (`--module pkg.mod`: accelerate,
    torchrun) and `path/script.py` operands.

    The command may be multi-line or start with a launcher (`python`, `accelerate launch ...`,
    `torchrun ...`). `-m pkg` naming a package runs `pkg/__main__.py`. Modules that are not under
    `root` (`-m torch.distributed.run`, ...) are ignored.
    """
    found: list[Path] = []
    for name in _ENTRY_MODULE.findall(cmd):
        path = module_file(name, root)
        if path is not None and path.name == "__init__.py" and (path.parent / "__main__.py").is_file():
            path = path.parent / "__main__.py"
        if path is not None and path not in found:
            found.append(path)
    for script in _ENTRY_SCRIPT.findall(cmd):
        path = Path(root, script)
        if path.is_file() and path not in found:
            found.append(path)
    return found


def parse(path: Path) -> ast.Module:
    """The AST of a Python file, cached until the file changes (mtime or size)."""
    stat = Path(path).stat()
    return _parse(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _parse(path: str, mtime_ns: int, size: int) -> ast.Module:
    return ast.parse(Path(path).read_text(), filename=path)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Collect the dotted names a module imports, anywhere in it (function bodies too: lazy imports run)."""

    def __init__(self, package: str):
        self.package = package  # the package relative imports are resolved against
        self.names: list[str] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):  # never runs: `if TYPE_CHECKING:` is False at run time
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.names.extend(alias.name for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".") if self.package else []
            parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base == "__future__":
            return
        self.names.append(base)
        # `from pkg import name`: `name` is a submodule when pkg/name.py (or pkg/name/) exists.
        self.names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("pkg.mod") / __import__("pkg.mod") with a literal name
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if called in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            self.names.append(node.args[0].value)
        self.generic_visit(node)


def direct_imports(path: Path, root: Path) -> list[Path]:
    """The project files under `root` that importing/running `path` executes directly (sorted, unique)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    visitor = _Imports(package)
    visitor.visit(parse(path))
    files = {f for imported in visitor.names for f in _with_parents(imported, root)}
    files.discard(path)
    return sorted(files)


def import_closure(entries: list[Path], root: Path) -> dict[Path, list[Path]]:
    """Every project file that running `entries` executes, each mapped to one shortest import chain.

    Found statically with `ast`, nothing is imported. Counted: `import a.b [as c]`, `from a.b import c`
    (c a submodule or a name), `from a import b` (b a module when a/b.py exists), relative imports,
    imports inside functions (they run when the function does), `importlib.import_module("a.b")` with a
    literal name, and the enclosing packages' `__init__.py`. Not counted: `if TYPE_CHECKING:` bodies.
    The chain starts at an entry and ends at the file: [entry, ..., file].
    """
    root = Path(root).resolve()
    chains: dict[Path, list[Path]] = {}
    queue: list[Path] = []
    for entry in entries:
        entry = Path(entry).resolve()
        # `python -m a.b` first imports package `a` (a/__init__.py), then runs a/b.py.
        for f in [*_with_parents(module_name(entry, root), root)[:-1], entry]:
            if f not in chains:
                chains[f] = [entry] if f == entry else [entry, f]
                queue.append(f)
    while queue:  # breadth first: chains are shortest
        current = queue.pop(0)
        for f in direct_imports(current, root):
            if f not in chains:
                chains[f] = [*chains[current], f]
                queue.append(f)
    return chains


def is_docstring(stmt: ast.stmt) -> bool:
    """A bare string statement (a module, class or function docstring)."""
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def inert_init_names(path: Path) -> set[str] | None:
    """For a package `__init__.py` holding only a docstring, `from __future__` imports and dunder constants
    (`__version__ = "0.1.0"`), the dunder names it defines; None when it holds anything else (code,
    imports, functions, classes, other names), which makes it a real dependency of every importer.
    """
    names: set[str] = set()
    for stmt in parse(path).body:
        if is_docstring(stmt) or (isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"):
            continue
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if all(isinstance(t, ast.Name) and t.id.startswith("__") and t.id.endswith("__") for t in targets) \
                    and _is_literal(stmt.value):
                names.update(t.id for t in targets)
                continue
        return None
    return names


def is_inert_init(path: Path) -> bool:
    """A package `__init__.py` that cannot change a stage's outputs on its own (see `inert_init_names`)."""
    return Path(path).name == "__init__.py" and inert_init_names(path) is not None


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except ValueError:
        return False
    return True


def names_read(path: Path) -> set[str]:
    """Every identifier a module reads as a name, an attribute, an imported name or a string (a superset)."""
    found: set[str] = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            found.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            found.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            found.add(node.value)  # getattr(pkg, "__version__")
    return found
