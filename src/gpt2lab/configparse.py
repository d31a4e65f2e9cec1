"""The config machinery: documented dataclasses <-> YAML, dotted overrides and argparse options.

It works on any tree of dataclasses whose fields carry docstrings (the string literal right after
each field, as in `architecture.GPTConfig`); `gpt2lab.config` holds the tree of a run.

    set_dotted(cfg, "optim.lr", "3e-4", "command line")    coerce to the field's type, or a UserError
    apply_yaml(cfg, path)                                   every key of a YAML file; errors name file:line
    parse_overrides(["--optim.lr", "3e-4"])                 -> [("optim.lr", "3e-4")]
    add_config_options(parser, RunConfig, "run")            one --section.field option per field, for --help

A `Literal[...]` field accepts only its values: coercion (and `check_choices`, for values set in
Python) is the one place they are checked; the same coercion refuses a float that is not finite
(nan, inf) and text holding a NUL byte. YAML (config files and command-line values) is read by
`read_yaml`, which refuses nesting deeper than MAX_YAML_DEPTH and aliases that expand to more than
MAX_YAML_VALUES values. Nothing here imports torch: the config classes are torch-free, so `--help`
is built from the live classes.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import functools
import inspect
import json
import math
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

from gpt2lab.errors import FileError, UserError
from gpt2lab.fileio import lone_surrogate, read_text, write_atomic

# --------------------------------------------------------------------------------------------------
# Field docs and types


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Docstrings of a dataclass's fields: the string literal right after each annotated field.

    A class made by `dataclasses.make_dataclass` has no source; it names the classes its fields
    come from in `__field_docs_from__`. A `{name}` in a docstring is filled from the class's
    `__doc_values__` (text derived from a table, so the help cannot drift from it).
    """
    docs: dict[str, str] = {}
    for klass in (*reversed(cls.__mro__), *getattr(cls, "__field_docs_from__", ())):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                doc = " ".join(inspect.cleandoc(nxt.value.value).split())
                for name, text in getattr(klass, "__doc_values__", {}).items():
                    doc = doc.replace("{" + name + "}", text)
                docs[node.target.id] = doc
    return docs


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a dataclass's fields (cached)."""
    return typing.get_type_hints(cls)


def _leaves(cls: type, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field, Any]]:
    """(dotted key, owning class, field, type) of every leaf field of a config tree, in declaration order."""
    for f in fields(cls):
        tp = hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", cls, f, tp


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def iter_fields(cls: type) -> list[tuple[str, Any, Any, str]]:
    """Every leaf field of a config tree: (dotted key, type, default, docstring), in declaration order."""
    return [(key, tp, _default(f), field_docs(owner).get(f.name, "")) for key, owner, f, tp in _leaves(cls)]


def get_dotted(cfg: Any, key: str) -> Any:
    """The value of field `key` ("optim.lr") of a config tree."""
    return functools.reduce(getattr, key.split("."), cfg)


def type_name(tp: Any) -> str:
    """A short name of a field type for help text: FLOAT, INT, BOOL, STR, LIST, cosine|wsd (a Literal), ..."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(type_name(a) for a in args)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (list, tuple):
        return "LIST"
    return getattr(tp, "__name__", str(tp)).upper()


# --------------------------------------------------------------------------------------------------
# Coercion


class CoerceError(ValueError):
    """A value that cannot be converted to a field's type."""


class ChoiceError(CoerceError):
    """A value outside a field's allowed values; says which they are, and the closest."""

    def __init__(self, value: Any, allowed: tuple) -> None:
        by_text = {str(a).lower(): a for a in allowed}
        close = difflib.get_close_matches(str(value).lower(), by_text, n=1, cutoff=0.6)
        hint = f"; did you mean {_shown(by_text[close[0]])}?" if close else ""
        super().__init__(f"is not one of {', '.join(map(_shown, allowed))}{hint}")


def _shown(value: Any) -> str:
    """A value as YAML spells it (true, false, null), text quoted."""
    return repr(value) if isinstance(value, str) else json.dumps(value)


MAX_YAML_DEPTH = 64
"""Deepest nesting of lists and mappings a YAML document may have (a run config needs 3)."""
MAX_YAML_VALUES = 100_000
"""Most values a YAML document may hold once its aliases are expanded (a billion laughs holds 10**9)."""

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_EXPECTED = {int: "expected an integer", float: "expected a number", str: "expected a string"}


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
        options = list(dict.fromkeys(options))
        for a in options:
            try:
                return coerce(value, a)
            except CoerceError as e:
                error = e
        finite = [(True, False) if a is bool else typing.get_args(a) for a in options
                  if a is bool or typing.get_origin(a) is Literal]
        if len(finite) == len(options):  # bool | Literal["auto"]: say every value
            raise ChoiceError(value, tuple(v for values in finite for v in values))
        if len(options) == 1:  # int | None, str | None: the one type's own reason
            raise error
        raise CoerceError(f"expected {type_name(tp)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ChoiceError(value, args)
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
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise CoerceError("expected true or false")
    if isinstance(value, bool) or tp not in _EXPECTED:
        raise CoerceError(_EXPECTED.get(tp, f"unsupported type {tp}"))
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise CoerceError(_EXPECTED[str])
        if "\0" in str(value):  # no path, name or text of a config holds one; open() refuses it
            raise CoerceError("text must not contain a NUL byte")
        return str(value)
    if isinstance(value, str):  # "1_000", "5e3" (an int), "6e-4" (YAML 1.1 reads it as text)
        text = value.replace("_", "")
        for parse in (int, float):
            with contextlib.suppress(ValueError):
                value = parse(text)
                break
    if isinstance(value, float) and not math.isfinite(value):  # nan, inf, 1e400
        raise CoerceError("expected a finite number" if tp is float else _EXPECTED[tp])
    if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
        try:
            return tp(value)
        except OverflowError:  # an integer beyond every float
            raise CoerceError("expected a finite number") from None
    raise CoerceError(_EXPECTED[tp])


def _is_instance(value: Any, tp: Any) -> bool:
    """Whether `value` has type `tp` already (3 is an int, not a float; True is a bool, not an int)."""
    if typing.get_origin(tp) in (list, tuple):
        return isinstance(value, (list, tuple))
    return type(value) is tp


def parse_scalar(text: str) -> Any:
    """A command-line value as YAML would read it ("3" -> 3, "true" -> True, "[a, b]" -> list); text
    that is not YAML stays text, and a value nested or aliased beyond `read_yaml`'s bounds is a UserError."""
    import yaml

    try:
        return read_yaml(text)[0]
    except _yaml_loader()[1] as e:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise UserError(f"the value {shown!r} is {e.problem}") from None
    except yaml.YAMLError:
        return text


@functools.cache
def _yaml_loader() -> tuple[type, type]:
    """(PyYAML's safe loader refusing nesting deeper than MAX_YAML_DEPTH, the error of a document beyond
    the bounds of `read_yaml`)."""
    import yaml

    class TooLarge(yaml.composer.ComposerError):
        pass

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    raise TooLarge(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                  self.peek_event().start_mark)
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedLoader, TooLarge


def read_yaml(text: str) -> tuple[Any, Any]:
    """(value, composed node) of a YAML document, read with PyYAML's safe loader; (None, None) if empty.

    The one place gpt2lab reads YAML. A document nested deeper than MAX_YAML_DEPTH, or whose aliases
    expand to more than MAX_YAML_VALUES values (a "billion laughs"), raises a yaml.YAMLError (with
    `problem` and `problem_mark`, like any syntax error) before any value is built from it, instead
    of exhausting the stack, the memory or the time of whatever reads it.
    """
    import yaml

    loader_class, too_large = _yaml_loader()
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        sizes: dict[int, int] = {}  # id(node) -> values under it with aliases expanded; each node sized once

        def size(n: Any) -> int:
            if id(n) not in sizes:
                if isinstance(n, yaml.MappingNode):
                    children = [child for pair in n.value for child in pair]
                else:
                    children = n.value if isinstance(n, yaml.SequenceNode) else []
                sizes[id(n)] = min(1 + sum(size(c) for c in children), MAX_YAML_VALUES + 1)
            return sizes[id(n)]

        if size(node) > MAX_YAML_VALUES:
            raise too_large(None, None, f"aliased to more than {MAX_YAML_VALUES:,} values once expanded",
                            node.start_mark)
        return loader.construct_document(node), node
    finally:
        loader.dispose()


def _problem(key: str, value: Any, tp: Any, error: CoerceError) -> str:
    """"optim.lr='x' is not a valid FLOAT: expected a number" or "optim.name='x' is not one of ...\""""
    if isinstance(error, ChoiceError):
        return f"{key}={value!r} {error}"
    return f"{key}={value!r} is not a valid {type_name(tp)}: {error}"


def check_choices(cfg: Any) -> None:
    """UserError for a choice field (one typed with a Literal) whose value is not one of its values."""
    for key, _, _, tp in _leaves(type(cfg)):
        if "Literal[" in str(tp):
            value = get_dotted(cfg, key)
            try:
                coerce(value, tp)
            except CoerceError as e:
                raise UserError(_problem(key, value, tp, e)) from None


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
            keys = [k for k, *_ in _leaves(type(cfg))]
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
                raise UserError(f"{where}: {_problem(key, value, tp, e)}") from None
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

    text = read_text(path)  # unreadable or not UTF-8: one line naming the file
    try:
        data, node = read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FileError(path, f"invalid YAML: {problem}", line=mark.line + 1 if mark is not None else None) from None
    except RecursionError:
        raise FileError(path, "invalid YAML: nested too deeply to read") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise FileError(path, "a config file must be a mapping of sections (model:, train:, ...)", line=1)
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    surrogate = lone_surrogate(data, text)  # YAML's "\\udc80" escape makes half a character, as JSON's does
    if surrogate is not None:
        raise FileError(path, surrogate[1], line=lines.get(surrogate[0]), field=surrogate[0])
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
# Serialising


def to_dict(cfg: Any) -> dict:
    """The config as plain dicts/lists/scalars (tuples become lists), for YAML and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_yaml(cfg: Any) -> str:
    """The config as YAML, sections in declaration order."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, width=100)


def save_yaml(cfg: Any, path: str | Path) -> None:
    """Write the resolved config (what the run actually used) as YAML."""
    write_atomic(path, to_yaml(cfg))


# --------------------------------------------------------------------------------------------------
# --help


def shown_default(cls: type, name: str, default: Any) -> str:
    """The default as --help shows it; a class may say it in words (`__shown_defaults__`)."""
    shown = getattr(cls, "__shown_defaults__", {}).get(name)
    if shown is not None:
        return shown
    return "null" if default is None else repr(default) if isinstance(default, str) else str(default)


def add_config_options(parser: argparse.ArgumentParser, cls: type, root_title: str) -> None:
    """One --section.field option per leaf field of the tree `cls`, grouped by section (the root's fields
    under `root_title`), each with its docstring, default and metavar (a choice field lists its values);
    values stay text (dest = the dotted key, absent unless given) for `set_dotted` to coerce."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, owner, f, tp in _leaves(cls):
        section = key.rpartition(".")[0]
        if section not in groups:
            doc = textwrap.fill(" ".join((owner.__doc__ or "").split()), width=100)
            groups[section] = parser.add_argument_group(section or root_title, doc)
        doc = field_docs(owner).get(f.name, "")
        help_ = f"{doc} (default: {shown_default(owner, f.name, _default(f))})".replace("%", "%%")
        kwargs: dict[str, Any] = dict(dest=key, default=argparse.SUPPRESS, metavar=type_name(tp), help=help_)
        if tp is bool:
            kwargs.update(nargs="?", const="true")
        groups[section].add_argument(f"--{key}", **kwargs)
