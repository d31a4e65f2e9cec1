"""The package is a stack of layers (docs/design.md): a module imports only from layers below it,
or from its own package in the same layer, and no import chain loops. Function-level (lazy) imports
and type-checking-only imports count like any other."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import gpt2lab

PACKAGE = Path(gpt2lab.__file__).parent

# Bottom to top. A module's layer is that of its longest listed prefix.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "console", "lm_eval_plugin"),
    ("losses", "download", "devices", "fileio", "timing"),
    ("configparse", "tokenizer", "timebudget", "architecture", "precision", "native_decode"),
    ("config", "chat_template"),
    ("sampling",),
    ("model",),
    ("data", "optim", "parallel", "metrics", "packed"),
    ("checkpoint", "hf", "lora", "gguf_export", "int8"),
    ("loading",),
    ("generate", "evaluate", "trainer", "bench"),
    ("dtype_choice",),
    ("run", "lm_eval"),
    ("serve",),
    ("commands", "api"),
    ("cli",),
    ("__main__", ""),  # "" = the package's own __init__ (the public API, exported lazily)
]


def layer_of(module: str) -> int:
    """The layer index of a module named relative to the package ("data.sft", "" for __init__)."""
    parts = module.split(".") if module else [""]
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        for i, names in enumerate(LAYERS):
            if prefix in names:
                return i
    raise AssertionError(f"gpt2lab.{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every gpt2lab module `path` imports, anywhere in the file, relative to the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(["gpt2lab", *[b for b in base if b]])
                mod = f"{prefix}.{node.module}" if node.module else prefix
            else:
                mod = node.module or ""
            # `from gpt2lab import checkpoint` names the submodule gpt2lab.checkpoint; a name that is
            # not a submodule (`from gpt2lab.model import GPT`) is taken from the module itself.
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            targets = subs if len(subs) == len(node.names) else [mod, *subs]
        for t in targets:
            if (t == "gpt2lab" or t.startswith("gpt2lab.")) and _is_module(t):
                found.add(t[len("gpt2lab."):] if t != "gpt2lab" else "")
    found.discard(module)
    return found


def _is_module(dotted: str) -> bool:
    """True when `dotted` ("gpt2lab.data.sft") names a module or package of gpt2lab."""
    if dotted == "gpt2lab":
        return True
    if not dotted.startswith("gpt2lab."):
        return False
    rel = PACKAGE.joinpath(*dotted.split(".")[1:])
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p, module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    return module.split(".")[0]


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_module_imports_upward_or_across_its_layer():
    problems = []
    for module, imports in import_graph().items():
        mine = layer_of(module)
        for target in sorted(imports):
            theirs = layer_of(target)
            same_room = room(target) == room(module) and module != ""
            if theirs > mine or (theirs == mine and not same_room):
                problems.append(f"gpt2lab.{module} (layer {mine}) imports gpt2lab.{target} (layer {theirs})")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ is imported with any of its submodules; that edge is Python's, not a cycle.
    visiting, done, cycles = [], set(), []

    def visit(node: str) -> None:
        if node in visiting:
            cycles.append(" -> ".join([*visiting[visiting.index(node):], node]))
            return
        if node in done:
            return
        visiting.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        visiting.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_model_imports_torch_stdlib_and_the_bottom_layers_only():
    tree = ast.parse((PACKAGE / "model.py").read_text(encoding="utf-8"))
    top_level = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            top_level.add((node.module or "").split(".")[0])
    assert top_level - set(sys.stdlib_module_names) <= {"torch", "gpt2lab"}
    assert import_graph()["model"] <= {"errors", "losses", "sampling", "architecture", "devices"}


def test_the_layer_check_sees_lazy_imports(tmp_path):
    """The parser finds an import inside a function body (what 'lazy imports count' rests on)."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from gpt2lab.run import train\n    import gpt2lab.loading\n")
    assert imported_modules(f, "model") == {"run", "loading"}
