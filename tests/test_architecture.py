"""The house rules, read from the source (docs/DESIGN.md "Layout"): imports run one way (trainer -> sharding ->
embeddings), no import circle anywhere, trainer/ grouped by job, short files, a short training loop, one name per
meaning, and docstrings that name modules and files that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("embeddings", "sharding", "trainer", "launch")
SOURCE_DIRS = PACKAGES + ("benchmarks", "examples", "tests")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _library_files() -> Dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, level: int, name: Optional[str], importer: str, is_package: bool) -> str:
    if level == 0:
        return module if name is None else f"{module}.{name}" if module else name
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    target = ".".join(base + ([module] if module else []))
    return target if name is None else f"{target}.{name}"


def _imports(path: Path, importer: str) -> Iterator[Tuple[str, int, str]]:
    """(imported name, line, how) for every import in the file: top level or inside a function, by statement
    or by string (``importlib.import_module("x")``, ``"pkg.module:Name"`` specs)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, "import"
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                yield _resolve(node.module or "", node.level, alias.name, importer, is_package), node.lineno, "from"
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.args[0].value, node.lineno, "string"
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = re.fullmatch(r"((?:embeddings|sharding|trainer|launch)(?:\.\w+)+):\w+", node.value)
            if match:  # a "package.module:Name" spec, imported by whoever reads it
                yield match.group(1), node.lineno, "string"


def _graph() -> Dict[str, Set[str]]:
    files = _library_files()
    graph: Dict[str, Set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for name, _, _ in _imports(path, module):
            while name and name not in files:  # "pkg.mod.attr" -> "pkg.mod"
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):  # a package's own __init__
                graph[module].add(name)
    return graph


def test_embeddings_never_imports_sharding_or_trainer() -> None:
    bad = []
    for module, path in _library_files().items():
        if not module.startswith("embeddings"):
            continue
        for name, line, how in _imports(path, module):
            if name.split(".")[0] in ("sharding", "trainer"):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {how} {name}")
    assert not bad, "embeddings/ reaches up:\n" + "\n".join(bad)


def test_sharding_never_imports_trainer() -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for module, path in _library_files().items()
           if module.startswith("sharding") for name, line, _ in _imports(path, module)
           if name.split(".")[0] == "trainer"]
    assert not bad, "sharding/ reaches up:\n" + "\n".join(bad)


def _cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_checker_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_trainer_grouped_by_job() -> None:
    direct = sorted(p.name for p in (ROOT / "trainer").glob("*.py"))
    assert len(direct) <= 12, direct
    for job in ("commands", "prepare", "train", "serve", "data"):
        assert (ROOT / "trainer" / job / "__init__.py").is_file(), job


def test_no_source_file_over_400_lines() -> None:
    long = [f"{p.relative_to(ROOT)}: {n}" for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > 400]
    assert not long, long


def _function(path: Path, name: str) -> ast.FunctionDef:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{name} not found in {path}")


def test_training_loop_is_short() -> None:
    loop = _function(ROOT / "trainer" / "train" / "loop.py", "run_training")
    assert loop.end_lineno is not None and loop.end_lineno - loop.lineno + 1 < 60


def test_one_name_one_meaning() -> None:
    """A module name appears once in the library, except the pairs embeddings/X <-> sharding/X (a module and its
    sharded form, as TorchRec's modules/ and distributed/)."""
    seen: Dict[str, List[str]] = {}
    for module, path in _library_files().items():
        if path.name != "__init__.py":
            seen.setdefault(path.stem, []).append(module)
    for stem, modules in seen.items():
        if len(modules) == 2 and {m.split(".")[0] for m in modules} == {"embeddings", "sharding"}:
            continue
        assert len(modules) == 1, f"{stem}: {modules}"


_PATH_REF = re.compile(r"(?<![\w/.-])((?:embeddings|sharding|trainer|launch|benchmarks|tests|configs|docs|examples)"
                       r"/[\w/.-]*\w\.(?:py|md|yaml|cpp|json|jsonl|txt|png))")
_DOTTED_REF = re.compile(r"(?<![\w./])((?:embeddings|sharding|trainer|launch)(?:\.[A-Za-z_]\w*)+)")


def _text_files() -> Iterator[Path]:
    for d in SOURCE_DIRS + ("docs",):
        for p in sorted((ROOT / d).rglob("*")):
            if p.suffix in (".py", ".md") and "results" not in p.parts:
                yield p
    yield ROOT / "README.md"


def _dotted_exists(name: str, files: Dict[str, Path]) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in files:
            rest = parts[cut:]
            if not rest:
                return True
            tree = ast.parse(files[module].read_text())
            defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {t.id for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                        for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
            defined |= {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                        if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
            return rest[0] in defined
    return False


def _config_keys() -> Set[str]:
    """``section.key`` of every config field (``embeddings.options``, ``launch.max_restarts``, ...): config keys
    share their first word with the packages."""
    sections = {"EmbeddingsConfig": "embeddings", "ShardingConfig": "sharding", "LaunchConfig": "launch"}
    tree = ast.parse((ROOT / "trainer" / "config.py").read_text())
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in sections:
            keys |= {f"{sections[node.name]}.{n.target.id}" for n in node.body
                     if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return keys


def test_docs_and_docstrings_name_what_exists() -> None:
    files = _library_files()
    keys = _config_keys()
    missing = []
    for path in _text_files():
        text = path.read_text()
        in_tests = path.relative_to(ROOT).parts[0] == "tests"
        for match in _PATH_REF.finditer(text):
            ref = match.group(1)
            if in_tests or (path.suffix == ".py" and ref.startswith("benchmarks/results/")):
                continue  # tests name missing files on purpose; a benchmark names where it will write
            if not (ROOT / ref).exists() and not any(x in ref for x in ("RUN_DIR", "runs/", "<", "*")):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
        for match in _DOTTED_REF.finditer(text):
            ref = match.group(1).rstrip(".")
            if ref.split(".")[-1] in ("py", "md", "yaml") or ".".join(ref.split(".")[:2]) in keys:
                continue
            if text[match.end():match.end() + 1] == "(" and "." not in ref.split(".", 1)[1]:
                continue  # a call on a variable named like a package (``embeddings.parameters()``)
            if not _dotted_exists(ref, files):
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, "references to nothing:\n" + "\n".join(sorted(set(missing)))
