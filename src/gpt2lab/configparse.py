"""The config machinery: documented dataclasses <-> YAML, dotted overrides and argparse options.

It works on any tree of dataclasses whose fields carry docstrings (the string literal right after
each field, as in `model.GPTConfig`); `gpt2lab.config` holds the tree of a run.

    set_dotted(cfg, "optim.lr", "3e-4", "command line")    coerce to the field's type, or a UserError
    apply_yaml(cfg, path)                                   every key of a YAML file; errors name file:line
    parse_overrides(["--optim.lr", "3e-4"])                 -> [("optim.lr", "3e-4")]
    load_schema("gpt2lab.config:RunConfig")                 the --help options of a tree, without importing it

The schema file (configs/schema.json, committed) holds every option of the trees the CLI shows, with
the sha256 of the source of each class that defines them. `--help` reads it and imports no torch;
when a class's source no longer matches (a config was edited), the options are built from the live
classes instead (slower: they import torch) and kept in the user cache until the next edit. Regenerate it with `python -m gpt2lab.configparse --write-schema`.

Nothing here imports torch, nor the modules that define configs (except `build_schema`, on demand).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import functools
import hashlib
import importlib
import inspect
import json
import sys
import textwrap
import types
import typing
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

from gpt2lab.errors import UserError
from gpt2lab.fileio import write_atomic

WRITE_SCHEMA_COMMAND = "python -m gpt2lab.configparse --write-schema"

# --------------------------------------------------------------------------------------------------
# Field docs and types


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields: the string literal right after each annotated field.

    A class made by `dataclasses.make_dataclass` has no source; it names the classes its fields
    come from in `__field_docs_from__`.
    """
    docs: dict[str, str] = {}
    for klass in (*reversed(cls.__mro__), *getattr(cls, "__field_docs_from__", ())):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a dataclass's fields (cached)."""
    return typing.get_type_hints(cls)


def iter_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """Every leaf field of a config tree: (dotted key, type, default, docstring), in declaration order."""
    out = []
    docs, types_ = field_docs(cls), hints(cls)
    for f in fields(cls):
        tp = types_[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out.extend(iter_fields(tp, key + "."))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append((key, tp, default, docs.get(f.name, "")))
    return out


def get_dotted(cfg: Any, key: str) -> Any:
    """The value of field `key` ("optim.lr") of a config tree."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def type_name(tp: Any) -> str:
    """A short name of a field type for help text: FLOAT, INT, BOOL, STR, LIST, ..."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in args)
    if origin in (list, tuple):
        return "LIST"
    return getattr(tp, "__name__", str(tp)).upper()


# --------------------------------------------------------------------------------------------------
# Coercion


class CoerceError(ValueError):
    """A value that cannot be converted to a field's type."""


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any) -> Any:
    """`value` (from YAML or the command line) converted to type `tp`; CoerceError if it cannot be."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
            raise CoerceError("null is not allowed")
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str):
            # Text converts to a non-text type where it can ("true" -> True in bool | str), else stays text.
            options = [a for a in options if a is not str] + [a for a in options if a is str]
        else:
            # Exact type first (so 3 stays an int in int | float), then conversions in declared order.
            options = [a for a in options if _is_instance(value, a)] + options
        for a in options:
            try:
                return coerce(value, a)
            except CoerceError:
                continue
        raise CoerceError(f"expected {type_name(tp)}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise CoerceError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise CoerceError("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value.replace("_", ""))
            with contextlib.suppress(ValueError):
                f = float(value)  # "5e3"
                if f.is_integer():
                    return int(f)
        raise CoerceError("expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise CoerceError("expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
        raise CoerceError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise CoerceError("expected a string")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = parse_scalar(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(coerce(v, args[0]) for v in value)
            if len(value) != len(args):
                raise CoerceError(f"expected a list of {len(args)} values")
            return tuple(coerce(v, a) for v, a in zip(value, args))
        return [coerce(v, args[0] if args else Any) for v in value]
    raise CoerceError(f"unsupported type {tp}")


def _is_instance(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    return isinstance(tp, type) and isinstance(value, tp)


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it ("3" -> 3, "true" -> True, "[a, b]" -> list)."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


# --------------------------------------------------------------------------------------------------
# Setting values


def suggest(key: str, keys: list[str]) -> str:
    """'; did you mean X?' for the known key closest to an unknown one, or ''."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return f"; did you mean '{same_leaf[0]}'?"
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        by_leaf = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in keys], n=1, cutoff=0.7)
        close = [k for k in keys if by_leaf and k.endswith("." + by_leaf[0])]
    return f"; did you mean '{close[0]}'?" if close else ""


def set_dotted(cfg: Any, key: str, value: Any, where: str) -> None:
    """Set field `key` ("optim.lr") of the config tree `cfg` to `value` coerced to the field's type.

    `where` says where the value came from ("command line", "configs/x.yaml:12") for error messages.
    """
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in fields(obj)}:
            keys = [k for k, *_ in iter_fields(type(cfg))]
            raise UserError(f"{where}: unknown config key '{key}'{suggest(key, keys)}")
        tp = hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise UserError(f"{where}: '{key}' is a section; set its fields, e.g. {key}.{fields(tp)[0].name}")
                for sub, v in value.items():
                    set_dotted(cfg, f"{key}.{sub}", v, where)
                return
            try:
                setattr(obj, part, coerce(value, tp))
            except CoerceError as e:
                raise UserError(f"{where}: {key}={value!r} is not a valid {type_name(tp)}: {e}") from None
            return
        obj = getattr(obj, part)


def apply_dict(cfg: Any, data: dict, where: str, lines: dict[str, int] | None = None) -> None:
    """Set every leaf of a nested mapping onto `cfg`; `lines` (dotted key -> line) locates errors in `where`."""
    for key, value, line in _flatten(data, lines or {}):
        set_dotted(cfg, key, value, f"{where}:{line}" if line else where)


def _flatten(data: dict, lines: dict[str, int], prefix: str = "") -> list[tuple[str, Any, int | None]]:
    """A nested mapping as (dotted key, value, line) leaves; sections recurse into their fields."""
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.extend(_flatten(v, lines, key + "."))
        else:
            out.append((key, v, lines.get(key)))
    return out


def flatten_dict(data: dict) -> dict[str, Any]:
    """A nested config mapping as {dotted key: value} (tuples and lists compare equal as lists)."""
    return {key: list(v) if isinstance(v, tuple) else v for key, v, _ in _flatten(data, {})}


def load_yaml(path: Path) -> tuple[dict, dict[str, int]]:
    """A YAML mapping and the 1-based line of each dotted key; UserError naming file:line on errors."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot read config {path} ({e.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{line}: invalid YAML: {problem}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: a config file must be a mapping of sections (model:, train:, ...)")
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return data, lines


def apply_yaml(cfg: Any, path: Path) -> None:
    """Apply every key of a YAML config file onto `cfg`; errors name the file and line."""
    data, lines = load_yaml(path)
    apply_dict(cfg, data, str(path), lines)


def parse_overrides(argv: list[str]) -> list[tuple[str, str]]:
    """["--optim.lr", "3e-4", "--train.compile", "--a.b=c"] -> [("optim.lr", "3e-4"), ("train.compile", "true"), ("a.b", "c")]."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}': overrides look like --section.field VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            i += 1
            value = argv[i]
        else:
            value = "true"  # a bare flag
        out.append((key, value))
        i += 1
    return out


# --------------------------------------------------------------------------------------------------
# Presets


def config_dir() -> Path:
    """The packaged presets folder (gpt2lab/configs)."""
    return Path(str(resources.files("gpt2lab").joinpath("configs")))


def preset_names() -> list[str]:
    """Names of the packaged YAML presets."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name ("quickstart") or a YAML path -> the file; UserError with the known names."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        return path
    candidate = config_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    names = preset_names()
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"unknown config '{name_or_path}' (presets: {', '.join(names)}; or a path to a .yaml){hint}")


# --------------------------------------------------------------------------------------------------
# Serialising


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts/lists/scalars (tuples become lists), for YAML and checkpoints."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def to_yaml(cfg: Any) -> str:
    """The config as YAML, sections in declaration order."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (what the run actually used) as YAML."""
    write_atomic(path, to_yaml(cfg))


# --------------------------------------------------------------------------------------------------
# Schema: the --help options of a config tree, readable without importing it

SCHEMA_FILE = "schema.json"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _shown_default(cls: type, name: str, default: Any) -> str:
    """The default as --help shows it; a class may say it in words (`__shown_defaults__`)."""
    shown = getattr(cls, "__shown_defaults__", {}).get(name)
    if shown is not None:
        return shown
    return "null" if default is None else repr(default) if isinstance(default, str) else str(default)


def _walk_classes(cls: type) -> list[type]:
    """The dataclasses of a tree: the root, its sections, their bases and the classes their docs come from."""
    found: list[type] = []

    def visit(c: type) -> None:
        for klass in (*c.__mro__, *getattr(c, "__field_docs_from__", ())):
            if dataclasses.is_dataclass(klass) and klass not in found:
                found.append(klass)
                for tp in hints(klass).values():
                    if dataclasses.is_dataclass(tp):
                        visit(tp)

    visit(cls)
    return found


@functools.lru_cache(maxsize=32)
def _class_sources(text: str) -> dict[str, str]:
    """The source (decorators included) of each top-level class of a module's text, by class name."""
    lines = text.splitlines()
    out = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef):
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            out[node.name] = "\n".join(lines[start - 1:node.end_lineno])
    return out


def _source_name(cls: type) -> str:
    """"file.py:Class" (relative to the gpt2lab package) for a class statement, "file.py" for a class made
    by a call (e.g. make_dataclass), whose definition is the whole file."""
    path = Path(sys.modules[cls.__module__].__file__).resolve().relative_to(_PACKAGE_DIR).as_posix()
    text = (_PACKAGE_DIR / path).read_text(encoding="utf-8")
    return f"{path}:{cls.__qualname__}" if cls.__qualname__ in _class_sources(text) else path


def _source_hash(source: str) -> str | None:
    """sha256 of a class's source ("file.py:Class") or of a whole file ("file.py"); None if it is gone."""
    path, _, name = source.partition(":")
    try:
        text = (_PACKAGE_DIR / path).read_text(encoding="utf-8")
    except OSError:
        return None
    if name:
        text = _class_sources(text).get(name)
        if text is None:
            return None
    return hashlib.sha256(text.encode()).hexdigest()


def _import(target: str) -> type:
    """The class "module:Name" names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def build_schema(target: str) -> dict:
    """The schema entry of the config tree `target` ("gpt2lab.config:RunConfig"), built from the live classes:
    {"sources": {"file.py:Class": sha256 of its source}, "sections": {dotted section: doc},
    "options": [{key, metavar, default (as shown), doc, bool}]}."""
    root = _import(target)
    sections = {"": " ".join((root.__doc__ or "").split())}
    options = []
    for key, tp, default, doc in iter_fields(root):
        section, _, name = key.rpartition(".")
        owner: Any = root
        for part in section.split(".") if section else ():
            owner = hints(owner)[part]
        sections.setdefault(section, " ".join((owner.__doc__ or "").split()))
        options.append({"key": key, "metavar": type_name(tp), "default": _shown_default(owner, name, default),
                        "doc": doc, "bool": tp is bool})
    names = {_source_name(c) for c in _walk_classes(root)}
    # A whole-file entry ("config.py") already covers that file's classes.
    sources = sorted(n for n in names if ":" not in n or n.split(":")[0] not in names)
    return {"sources": {source: _source_hash(source) for source in sources}, "sections": sections,
            "options": options}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _cache_file() -> Path:
    """Where schema entries built from edited classes are kept, so only the first --help after an edit is slow."""
    from gpt2lab.download import cache_dir

    return cache_dir() / SCHEMA_FILE


def _is_current(entry: dict | None) -> bool:
    return bool(entry) and all(_source_hash(source) == digest for source, digest in entry["sources"].items())


def load_schema(target: str) -> dict:
    """The schema entry of `target` (see `build_schema`): from the committed schema file while the
    sources of its classes are unchanged (read and hashed, not imported), else from the user cache
    on the same terms, else built from the live classes and cached."""
    committed = _read_json(config_dir() / SCHEMA_FILE).get(target)
    if _is_current(committed):
        return committed
    cached = _read_json(_cache_file())
    if _is_current(cached.get(target)):
        return cached[target]
    entry = build_schema(target)
    with contextlib.suppress(OSError):  # a read-only home only costs speed
        _cache_file().parent.mkdir(parents=True, exist_ok=True)
        _cache_file().write_text(json.dumps({**cached, target: entry}), encoding="utf-8")
    return entry


def write_schema(targets: list[str] | None = None) -> Path:
    """Regenerate the schema file: the entries it has, plus `targets` ("module:Class")."""
    names = sorted({*_read_json(config_dir() / SCHEMA_FILE), *(targets or [])})
    path = config_dir() / SCHEMA_FILE
    data = {name: build_schema(name) for name in names}
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def add_schema_arguments(parser: argparse.ArgumentParser, schema: dict, root_title: str) -> None:
    """One --section.field option per schema option, grouped by section (the root's fields under `root_title`),
    each with its docstring and default; values stay text (dest = the dotted key, absent unless given)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in schema["options"]:
        section = option["key"].rpartition(".")[0]
        if section not in groups:
            doc = textwrap.fill(schema["sections"].get(section, ""), width=100)
            groups[section] = parser.add_argument_group(section or root_title, doc)
        help_ = f"{option['doc']} (default: {option['default']})".replace("%", "%%")
        kwargs: dict[str, Any] = dict(dest=option["key"], default=argparse.SUPPRESS, metavar=option["metavar"],
                                      help=help_)
        if option["bool"]:
            kwargs.update(nargs="?", const="true")
        groups[section].add_argument(f"--{option['key']}", **kwargs)


def main(argv: list[str] | None = None) -> int:
    """`python -m gpt2lab.configparse --write-schema [module:Class ...]`."""
    parser = argparse.ArgumentParser(prog="python -m gpt2lab.configparse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-schema", action="store_true", required=True,
                        help=f"regenerate gpt2lab/configs/{SCHEMA_FILE} from the live config classes")
    parser.add_argument("targets", nargs="*", metavar="module:Class", help="config trees to add to the file")
    args = parser.parse_args(argv)
    print(f"wrote {write_schema(args.targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
