"""Which project modules a stage runs: the transitive closure of its imports, read with `ast`.

One answer serves two jobs: the deps test checks that dvc.yaml lists these modules
for every stage (so `dvc status` sees a code change), and the training loop hashes
exactly these files into its checkpoint fingerprint (so a run never resumes a
checkpoint written by other code). Imports inside functions count: they run.
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("digit", "stages")


def _module_file(name: str, root: Path) -> Path | None:
    """digit.x -> root/digit/x.py (or a package's __init__.py), None for anything outside the project."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    base = root.joinpath(*parts)
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _direct_imports(path: Path, root: Path) -> set[Path]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found: set[Path] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from digit import x`: x may be a module
        for name in names:
            # `import digit.a.b` also runs digit/__init__.py and digit/a/__init__.py
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                module = _module_file(".".join(parts[:i]), root)
                if module is not None:
                    found.add(module)
    found.discard(path)
    return found


@lru_cache(maxsize=None)
def _closure(entry: Path, root: Path) -> frozenset[Path]:
    seen, todo = {entry}, [entry]
    while todo:
        for module in _direct_imports(todo.pop(), root):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return frozenset(seen)


def project_modules(entry: str | Path, root: str | Path = ROOT) -> list[str]:
    """Repository-relative paths of `entry` and every project module it imports, directly or not, sorted."""
    root = Path(root).resolve()
    entry = Path(entry)
    entry = (entry if entry.is_absolute() else root / entry).resolve()
    return sorted(str(p.relative_to(root)) for p in _closure(entry, root))


def code_digest(entry: str | Path, root: str | Path = ROOT) -> str:
    """sha256 over the names and bytes of project_modules(entry)."""
    root = Path(root).resolve()
    digest = hashlib.sha256()
    for rel in project_modules(entry, root):
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return digest.hexdigest()
