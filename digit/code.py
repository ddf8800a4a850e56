"""Which project modules a stage runs: the transitive closure of its imports, read with `ast`.

One answer serves two jobs: tests/test_deps.py checks that dvc.yaml lists these modules for
every stage (so `dvc status` sees a code change), and digit.trainer hashes exactly these files
into its checkpoint fingerprint (so a run never resumes a checkpoint written by other code).
Nothing is imported. Counted: `import a.b [as c]`, `from a.b import c` (c a submodule or a name),
`from a import b`, relative imports, imports inside functions (they run when the function does),
`importlib.import_module("a.b")` with a literal name, and the enclosing packages' `__init__.py`.
Not counted: `if TYPE_CHECKING:` bodies.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def project_modules(entry: str | Path, root: str | Path = ROOT) -> list[str]:
    """Root-relative paths of every project file running `entry` executes (itself included), sorted."""
    root = Path(root).resolve()
    entry = Path(entry)
    entry = entry if entry.is_absolute() else root / entry
    return sorted(f.relative_to(root).as_posix() for f in import_closure([entry], root))


def code_digest(entry: str | Path, root: str | Path = ROOT) -> str:
    """sha256 over the names and bytes of project_modules(entry): the code of a run."""
    root = Path(root).resolve()
    digest = hashlib.sha256()
    for name in project_modules(entry, root):
        digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    return digest.hexdigest()
