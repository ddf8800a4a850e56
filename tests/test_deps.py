"""Every DVC stage lists, in its `deps`, each project module its command runs, and no other.

A module missing from `deps` means an edit to it does not re-run the stage: `dvc repro` keeps stale
outputs (e.g. a change to `digit/params.py`'s `seed_for` would not re-seed anything). A module listed
but never imported re-runs the stage for nothing. Checked statically (DVC's own stage resolution,
`ast` for imports; no `dvc repro`, no stage is imported), in about a second.

What counts as "runs": the entry modules of the stage's cmd (`-m stages.NAME`) and, transitively, every
project module they import, anywhere in the file (imports inside functions run too), including the
packages' `__init__.py` -- see `digit.code.import_closure`. Two kinds of module may be left out of deps (and
may also be listed, if the stage imports them):

- the modules in EXEMPT below, whose code cannot change any output (checked by
  test_exempt_modules_are_only_glue);
- a package `__init__.py` holding only a docstring and dunder constants (`digit/__init__.py` has
  `__version__`; `stages/__init__.py` only a docstring), provided no stage reads those constants
  (checked by test_inert_package_inits_are_not_read). An `__init__.py` with any other code is required.

The imports of exempt modules and of `__init__.py` files are followed all the same: they run.
"""

from __future__ import annotations

import ast
import builtins
import functools
from pathlib import Path

import pytest

from conftest import ROOT
from digit.code import direct_imports, import_closure, module_name
from helpers import StageInfo, dvc_stages, entry_modules, inert_init_names, is_docstring, is_inert_init, names_read

# Modules a stage may leave out of deps: a change to them cannot change any output of any stage.
EXEMPT = {
    "digit/cli.py": (
        "entrypoint glue only: stage_parser() builds the argparse parser (the path arguments come from "
        "the stage's cmd, which DVC hashes; --params defaults to params.yaml, whose keys DVC tracks); run() "
        "turns a stage's expected failures (the digit.errors classes, OutputError, a failed write) into one "
        "message and an exit status; require_git_commit() refuses to start in a git repository without a "
        "commit. They decide whether a stage fails and what it prints, never a value it writes"),
    "digit/errors.py": (
        "exception classes with a docstring and no body (ConfigError, BadImageError, ...): the message a "
        "stage prints is built where it raises, and the classes compute nothing"),
    "digit/schema.py": (
        "the params.yaml schema: validate() reads the parameters and returns one message per problem (type, "
        "range, unknown or missing key, cross-field rule), and load_params raises them; it never changes a "
        "value a stage reads (load_params returns the YAML as read), so an edit can only make a stage refuse "
        "or accept its params, never change what it writes. DVC tracks every value itself, key by key"),
}
# What test_exempt_modules_are_only_glue pins, so that new code in an exempt module forces a review here.
CLI_FUNCTIONS = {"stage_parser", "run", "require_git_commit"}
CLI_PROJECT_IMPORTS = {"digit/atomic.py", "digit/errors.py"}
SCHEMA_NAMES = {"Spec", "_names", "PRECISIONS", "SCHEMA", "_flatten", "validate"}
SCHEMA_PROJECT_IMPORTS = {"digit/params.py", "digit/precision.py"}

FIX = ("Fix dvc.yaml: add each missing module to the stage's deps in dvc.yaml (stages re-run only when a "
       "dep changes, so a module left out lets `dvc repro` keep outputs of old code); remove each 'listed but "
       "not imported' one from that stage's deps (it re-runs the stage for nothing). A module that cannot "
       "change any output may instead go to EXEMPT in tests/test_deps.py, with the reason.")


def rel(path: Path, root: Path = ROOT) -> str:
    return path.resolve().relative_to(root).as_posix()


def covered(module: str, deps: set[str]) -> bool:
    """Listed itself, or under a listed directory (e.g. deps: [digit])."""
    return any(module == dep or module.startswith(dep.rstrip("/") + "/") for dep in deps)


def stage_drift(stage: StageInfo, root: Path = ROOT) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(missing, stale) for one stage: [(module, import chain)] it runs but does not list (EXEMPT and inert
    `__init__.py` aside), and the .py deps it lists but never imports. Raises if its cmd runs no module."""
    entries = entry_modules(stage.cmd, root)
    if not entries:
        raise LookupError(f"{stage.name}: no project module found in its cmd (expected `-m stages.NAME`): "
                          f"{stage.cmd!r}; teach helpers.entry_modules the new form")
    runs = {rel(f, root): [rel(c, root) for c in chain] for f, chain in import_closure(entries, root).items()}
    deps = set(stage.deps)
    missing = [(m, chain) for m, chain in sorted(runs.items())
               if m not in EXEMPT and not is_inert_init(root / m) and not covered(m, deps)]
    stale = sorted(d for d in deps if d.endswith(".py") and d not in runs)
    return missing, stale


@pytest.fixture(scope="module")
def stages():
    found = dvc_stages(ROOT)
    assert found, f"no stages found in {ROOT / 'dvc.yaml'}"
    return found


def test_stage_deps_list_the_code_they_run(stages):
    problems = []
    for stage in stages:
        try:
            missing, stale = stage_drift(stage)
        except LookupError as exc:
            problems.append(f"  {exc}")
            continue
        if not missing and not stale:
            continue
        lines = [f"  {stage.name}:"]
        if missing:
            lines.append("    missing (add it to the stage's deps in dvc.yaml):")
            lines += [f"      {m}    imported via {' -> '.join(chain)}" for m, chain in missing]
        if stale:
            lines.append("    listed but not imported (remove it from the stage's deps in dvc.yaml):")
            lines += [f"      {d}" for d in stale]
        problems.append("\n".join(lines))
    if problems:
        pytest.fail("stage deps out of sync with the code each stage runs:\n" + "\n".join(problems) + "\n" + FIX,
                    pytrace=False)


def test_every_stage_can_enter_the_run_cache():
    """DVC saves a stage to its run cache only when each uncached out (`cache: false`) is a metric or a plot
    (dvc/stage/__init__.py, `reproduce`). One plain uncached folder, and every arm or experiment that returns
    to an earlier setting of that stage runs it again (train_encoder's DVCLive folder once did: each SSL arm
    trained its ViT anew)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        blocked = [f"  {stage.addressing}: {out.def_path}" for stage in repo.index.stages for out in stage.outs
                   if not out.use_cache and not (out.is_metric or out.is_plot)]
    if blocked:
        pytest.fail("outs with `cache: false` that are neither metrics nor plots keep their stage out of DVC's run "
                    "cache:\n" + "\n".join(blocked) + "\ncache them (drop `cache: false`), or declare the files "
                    "under `metrics:`/`plots:`", pytrace=False)


def test_exempt_modules_are_only_glue():
    """Each EXEMPT entry exists, and still holds only what its reason says (new code there needs a review)."""
    for path, reason in EXEMPT.items():
        assert (ROOT / path).is_file(), f"EXEMPT lists {path}, which no longer exists: remove it from EXEMPT"
        assert reason.strip(), f"EXEMPT[{path!r}] needs a reason"

    review = "review its EXEMPT entry in tests/test_deps.py (or drop the entry and list the module in deps)"

    # digit/errors.py: exception classes with a docstring (or pass) only, deriving from builtin exceptions.
    errors = ROOT / "digit/errors.py"
    for stmt in ast.parse(errors.read_text()).body:
        if is_docstring(stmt) or (isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"):
            continue
        assert isinstance(stmt, ast.ClassDef), \
            f"digit/errors.py line {stmt.lineno}: not an exception class; {review}"
        bases = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in stmt.bases]
        builtin = [getattr(builtins, b, None) for b in bases]
        assert bases and all(isinstance(b, type) and issubclass(b, BaseException) for b in builtin), \
            f"digit/errors.py: {stmt.name}{tuple(bases)} derives from more than builtin exceptions; {review}"
        assert all(is_docstring(s) or isinstance(s, ast.Pass) for s in stmt.body), \
            f"digit/errors.py: class {stmt.name} has a body beyond its docstring; {review}"

    # digit/cli.py: the three glue functions, importing only atomic (for messages) and errors.
    cli = ROOT / "digit/cli.py"
    tree = ast.parse(cli.read_text())
    functions = set()
    for stmt in tree.body:
        if is_docstring(stmt) or isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        assert isinstance(stmt, ast.FunctionDef), \
            f"digit/cli.py line {stmt.lineno}: module-level code beyond imports and functions; {review}"
        functions.add(stmt.name)
    assert functions == CLI_FUNCTIONS, \
        f"digit/cli.py defines {sorted(functions)}, reviewed: {sorted(CLI_FUNCTIONS)}; {review}"
    imports = {rel(f) for f in direct_imports(cli, ROOT)} - {"digit/__init__.py"}
    assert imports == CLI_PROJECT_IMPORTS, \
        f"digit/cli.py imports {sorted(imports)}, reviewed: {sorted(CLI_PROJECT_IMPORTS)}; {review}"

    # digit/schema.py: the reviewed names only, importing the seed constants (params) and, for the precision
    # rule, digit.precision; load_params hands back the tree it validated, unchanged.
    schema = ROOT / "digit/schema.py"
    names = set()
    for stmt in ast.parse(schema.read_text()).body:
        if is_docstring(stmt) or isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        assert isinstance(stmt, (ast.FunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)), \
            f"digit/schema.py line {stmt.lineno}: module-level code beyond definitions; {review}"
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", stmt)]
        names |= {getattr(t, "id", getattr(t, "name", None)) for t in targets}
    assert names == SCHEMA_NAMES, f"digit/schema.py defines {sorted(names)}, reviewed: {sorted(SCHEMA_NAMES)}; {review}"
    imports = {rel(f) for f in direct_imports(schema, ROOT)} - {"digit/__init__.py"}
    assert imports == SCHEMA_PROJECT_IMPORTS, \
        f"digit/schema.py imports {sorted(imports)}, reviewed: {sorted(SCHEMA_PROJECT_IMPORTS)}; {review}"
    from digit.params import Yaml12Loader, load_params

    text = (ROOT / "params.yaml").read_text()
    import yaml

    assert load_params(ROOT / "params.yaml") == yaml.load(text, Loader=Yaml12Loader)


def test_inert_package_inits_are_not_read(stages):
    """An `__init__.py` left out of deps for holding only dunder constants must not have them read by a stage."""
    reads = functools.cache(names_read)
    problems = set()
    for stage in stages:
        runs = import_closure(entry_modules(stage.cmd, ROOT), ROOT)
        for init in (f for f in runs if is_inert_init(f)):
            defined = inert_init_names(init)
            for module in runs:
                if module != init and (read := defined & reads(module)):
                    problems.add(f"  {stage.name}: {rel(module)} reads {sorted(read)} from {rel(init)}: list "
                                 f"{rel(init)} in the stage's deps in dvc.yaml, and make tests/test_deps.py "
                                 f"require it")
    assert not problems, "\n".join(sorted(problems))


def test_import_closure_counts_every_import_form(tmp_path):
    """The helpers on a toy project: each import form, lazy and relative imports, `if TYPE_CHECKING`."""
    files = {
        "pkg/__init__.py": '"""Docstring only."""\n__version__ = "1"\n',
        "pkg/main.py": (
            "from __future__ import annotations\n"
            "import os, json\n"
            "from typing import TYPE_CHECKING\n"
            "import pkg.aliased as al\n"
            "from pkg import frommod, not_a_module\n"
            "from pkg.fromname import thing\n"
            "from .relative import x\n"
            "import importlib\n"
            "def lazy():\n"
            "    from . import lazy_mod\n"
            "    return importlib.import_module('pkg.dynamic')\n"
            "if TYPE_CHECKING:\n"
            "    import pkg.typing_only\n"
            "else:\n"
            "    import pkg.sub.deep\n"
        ),
        "pkg/aliased.py": "", "pkg/frommod.py": "", "pkg/fromname.py": "thing = 1\nnot_a_module = 2\n",
        "pkg/relative.py": "from .. import pkg as _\nfrom .transitive import y\n", "pkg/transitive.py": "",
        "pkg/lazy_mod.py": "", "pkg/dynamic.py": "", "pkg/typing_only.py": "", "pkg/unused.py": "",
        "pkg/sub/__init__.py": "import os\n", "pkg/sub/deep.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    cmd = "accelerate launch --multi_gpu --num_processes 2\n  -m pkg.main --out x -m torch.distributed.run"
    entries = entry_modules(cmd, tmp_path)
    assert entries == [tmp_path / "pkg/main.py"]
    runs = import_closure(entries, tmp_path)
    assert {module_name(f, tmp_path) for f in runs} == {
        "pkg", "pkg.main", "pkg.aliased", "pkg.frommod", "pkg.fromname", "pkg.relative", "pkg.transitive",
        "pkg.lazy_mod", "pkg.dynamic", "pkg.sub", "pkg.sub.deep"}
    assert [module_name(f, tmp_path) for f in runs[tmp_path / "pkg/transitive.py"]] == \
        ["pkg.main", "pkg.relative", "pkg.transitive"]
    assert is_inert_init(tmp_path / "pkg/__init__.py") and not is_inert_init(tmp_path / "pkg/sub/__init__.py")



def test_stage_drift_reports_missing_and_stale(tmp_path):
    """`stage_drift` on a toy project: a missing module with its chain, a stale dep, EXEMPT and inert inits."""
    files = {
        "digit/__init__.py": '"""Docstring."""\n__version__ = "1"\n', "stages/__init__.py": '"""Docstring."""\n',
        "digit/cli.py": "", "digit/params.py": "", "digit/old.py": "", "digit/used.py": "",
        "stages/x.py": "from digit.cli import run\nfrom digit import params\nimport digit.used\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    stage = StageInfo("x@a", "python -m stages.x --out o",
                      ("stages/x.py", "digit/used.py", "digit/old.py", "digit/cli.py", "data/in"))
    assert stage_drift(stage, tmp_path) == ([("digit/params.py", ["stages/x.py", "digit/params.py"])],
                                            ["digit/old.py"])
    # EXEMPT modules and inert __init__.py files are not required; a directory dep covers the modules under it.
    stage = StageInfo("x@b", "python -m stages.x", ("stages/x.py", "digit"))
    assert stage_drift(stage, tmp_path) == ([], [])
    with pytest.raises(LookupError, match="no project module"):
        stage_drift(StageInfo("y", "echo hi", ()), tmp_path)


def test_dvc_stages_expands_foreach_and_matrix(tmp_path):
    """Stage names, commands and deps come out as `dvc repro` sees them: interpolated, one per item."""
    from dvc.repo import Repo

    Repo.init(str(tmp_path), no_scm=True).close()
    (tmp_path / "params.yaml").write_text("base:\n  launcher: accelerate launch --multi_gpu\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  train:\n"
        "    foreach: [digit, vq]\n"
        "    do:\n"
        "      cmd: >-\n"
        "        ${base.launcher} -m stages.train --kind ${item}\n"
        "        --out models/${item}\n"
        "      deps:\n"
        "        - stages/train.py\n"
        "        - data/${item}\n"
        "      params:\n"
        "        - base.launcher\n"
        "      outs:\n"
        "        - models/${item}\n"
        "  grid:\n"
        "    matrix:\n"
        "      k: [8, 16]\n"
        "    wdir: sub\n"
        "    cmd: python -m stages.codebook --k ${item.k}\n"
        "    deps: [../stages/codebook.py]\n")
    stages = {s.name: s for s in dvc_stages(tmp_path)}
    assert set(stages) == {"train@digit", "train@vq", "grid@8", "grid@16"}
    assert stages["train@vq"].cmd == "accelerate launch --multi_gpu -m stages.train --kind vq --out models/vq"
    assert stages["train@vq"].deps == ("stages/train.py", "data/vq")
    assert stages["grid@16"].deps == ("stages/codebook.py",)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["digit/gan.py", "digit/trainer.py", "digit/fid.py", "digit/params.py"])
def test_editing_a_module_makes_dvc_status_name_exactly_its_importers(full_repo, tmp_path, module):
    """After a full `dvc repro`, an edit to one module: `dvc status` reports exactly the stages whose code
    (digit.code.import_closure of their entry modules) includes it, and no others."""
    import json

    from conftest import dvc, sh

    repo = tmp_path / "repo"
    sh(f"cp -a {full_repo} {repo}", tmp_path)
    with open(repo / module, "a") as fh:
        fh.write("\n# an edit\n")
    status = json.loads(dvc("status --json", repo).stdout or "{}")
    reported = {name for name, changes in status.items()
                if any(isinstance(c, dict) and module in c.get("changed deps", {}) for c in changes)}
    importers = {stage.name for stage in dvc_stages(repo)
                 if any(rel(f, repo.resolve()) == module for f in import_closure(entry_modules(stage.cmd, repo), repo))}
    assert importers, f"no stage imports {module}"
    assert reported == importers, f"dvc status names {sorted(reported)}, the stages importing {module} are {sorted(importers)}"
