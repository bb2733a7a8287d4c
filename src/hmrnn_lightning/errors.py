"""Bad input as one line: which errors are the user's, and how to say them.

A user error (bad config value, missing data, unusable checkpoint) is reported as one
``hmrnn: error: ...`` line and exit code 2; anything else is a bug and keeps its traceback.
This module imports nothing heavy, so the entry point can use it before Lightning is loaded.
"""

from __future__ import annotations

import re
import sys
from typing import Any


class ConfigError(ValueError):
    """A config that cannot be used, with where and why."""


#: jsonargparse report lines that describe the search, not the fault
_NOISE = (
    "Does not validate against any of the Union subtypes",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Given value:",
    "- Expected a <class 'NoneType'>",
    "Expected a <class 'NoneType'>",
    "Not a valid subclass of NoneType",
    "- Expected a path but",  # the callable-by-import-path alternative of a class-typed key
    "Expected a path but",
    "- Expected a dot import path string",
    "Expected a dot import path string",
)
_KEY = re.compile(r'^(?:- )?Parser key "([^"]+)":?\s*(.*)$')
_CLASS = re.compile(r"^(?:- )?Problem with given class_path '([^']+)':\s*(.*)$")


def config_error_line(message: str, args: list[str] | None = None) -> str:
    """One line from jsonargparse's nested error report: the full key, the class it belongs to,
    and the innermost reason (which holds the value given and what is allowed).

    jsonargparse nests one report per level (``Parser key "data":`` / ``Problem with given
    class_path ...:`` / ``- <alternative>``), indented; the reason is the deepest line that is
    neither a heading nor a rejected alternative (``None``, an import path). For a value given
    on the command line jsonargparse reports the innermost key only (``batch_size``); the full
    key is then taken from the argument that set it, when ``args`` are given.
    """
    line = _config_error_line(message)
    key, sep, rest = line.partition(": ")
    if not sep or not key:
        return line
    name, _, cls = key.partition(" ")
    deeper = _given_key(message, rest)
    if deeper and not name.endswith(deeper):
        name = _extended(name, deeper)
    if "." not in name and args:
        name = _key_in_args(name, rest, args) or name
    return f"{name}{' ' + cls if cls else ''}: {rest}"


def _extended(name: str, deeper: str) -> str:
    """``name`` carried down to ``deeper``, a key relative to some level of it: where the end of
    ``name`` begins ``deeper`` (``model.init_args.stack`` and ``stack.init_args.estimator``) they
    overlap; else ``deeper`` is below ``name``'s class (``.init_args.``)."""
    parts, below = name.split("."), deeper.split(".")
    for k in range(min(len(parts), len(below)), 0, -1):
        if parts[-k:] == below[:k]:
            return ".".join(parts + below[k:])
    return f"{name}.{deeper}" if deeper.startswith("init_args.") else f"{name}.init_args.{deeper}"


def _given_key(message: str, reason: str) -> str | None:
    """The part of the key below the reported one, from jsonargparse's ``Given value:`` line: a
    command-line ``NestedArg(key=...)``, or the place in a given mapping of the value the reason quotes."""
    import ast

    given = next((line.strip()[len("Given value:"):].strip() for line in message.splitlines() if line.strip().startswith("Given value:")), None)
    if not given:
        return None
    m = re.match(r"NestedArg\(key='([^']+)'", given)
    if m:
        return m.group(1)
    quoted = re.findall(r"'([^']*)'", reason)
    try:
        value = ast.literal_eval(given)
    except (ValueError, SyntaxError):
        return None
    paths = [k for k, v in leaves(value) if str(v) in quoted]
    return max(paths, key=lambda k: k.count("."), default=None)


def leaves(node: Any, key: str = "", into_lists: bool = True):
    """``(dotted.key, value)`` for every leaf of nested mappings (and lists: ``key[n]``, unless
    ``into_lists`` is False, when a list is one leaf)."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{key}.{k}" if key else str(k), into_lists)
    elif isinstance(node, list) and into_lists:
        for n, v in enumerate(node):
            yield from leaves(v, f"{key}[{n}]", into_lists)
    else:
        yield key, node


def _key_in_args(leaf: str, reason: str, args: list[str]) -> str | None:
    """The full key of ``leaf``: from the command-line flag that set it, else from the config file
    (``-c``/``--config``, the last one that holds it) with the value the reason quotes."""
    for arg in reversed(args):
        flag = arg.split("=", 1)[0].lstrip("-")
        if arg.startswith("--") and (flag.endswith(f".{leaf}") or flag.endswith(f".{leaf}.class_path")):
            return flag[: -len(".class_path")] if flag.endswith(".class_path") else flag
    got = re.search(r"Got value: (.*)$", reason)
    found = None
    for k, arg in enumerate(args[:-1]):
        if arg not in ("-c", "--config"):
            continue
        for key, value in leaves(_read_yaml(args[k + 1])):
            if key.rsplit(".", 1)[-1] == leaf and (got is None or str(value) == got.group(1).strip()):
                found = key
    return found


def _read_yaml(path_or_text: str) -> Any:
    import yaml
    from pathlib import Path

    try:
        path = Path(path_or_text)
        return yaml.safe_load(path.read_text() if path.is_file() else path_or_text)
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _config_error_line(message: str) -> str:
    rows = [(len(line) - len(line.lstrip()), line.strip()) for line in message.splitlines() if line.strip()]
    best: tuple[int, int] | None = None  # (depth, row index) of the deepest reason
    for i, (indent, text) in enumerate(rows):
        if text.removeprefix("- ").startswith(_NOISE) or _is_heading(text):  # noise also comes as an alternative ("- ")
            continue
        depth = len(_ancestors(rows, i))
        if best is None or depth > best[0]:
            best = (depth, i)
    if best is None:
        keys, reason = [], ""
        # a heading alone ("Parser key "x": reason"): its reason is on the same line
        for indent, text in rows:
            m = _KEY.match(text)
            if m:
                keys.append(m.group(1))
                reason = m.group(2) or reason
        return _tidy(f"{'.'.join(keys)}: {reason}" if keys else (rows[0][1] if rows else message))
    i = best[1]
    keys, classes = [], []
    for text in reversed(_ancestors(rows, i)):
        m = _KEY.match(text)
        if m:
            keys.append(m.group(1))
            continue
        m = _CLASS.match(text)
        if m:
            classes.append(m.group(1))
            keys.append("init_args")
    m = _KEY.match(rows[i][1])
    reason = rows[i][1].removeprefix("- ")
    if m:  # 'Parser key "x": reason' as the deepest line
        keys.append(m.group(1))
        reason = m.group(2)
    while keys and keys[-1] == "init_args":
        keys.pop()
    where = ".".join(keys)
    where += f" ({classes[-1]})" if classes else ""
    return _tidy(f"{where}: {reason}" if where else reason)


def _is_heading(text: str) -> bool:
    m = _KEY.match(text) or _CLASS.match(text)
    return bool(m) and not m.group(2)


def _ancestors(rows: list[tuple[int, str]], i: int) -> list[str]:
    """Headings enclosing row ``i`` (less indented, above it), innermost first."""
    out, indent = [], rows[i][0]
    for j in range(i - 1, -1, -1):
        ind, text = rows[j]
        if ind < indent and _is_heading(text):
            out.append(text)
            indent = ind
    return out


def _tidy(line: str) -> str:
    line = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", line)
    line = re.sub(r"Expected a (int|float|bool|str|list|dict)\. Got value: ", r"expected \1, got ", line)
    return " ".join(line.split())


# -- errors raised while the components are built --------------------------------------------------------


def constructor_error_line(exc: BaseException, config: Any) -> str | None:
    """One line for an error raised by a component's constructor (a check of its arguments), or
    ``None`` if the error is not one: then it is a bug and keeps its traceback.

    jsonargparse re-raises a constructor's error as the cause of its own; the innermost cause is
    the component's. It counts as the user's when it is a ``ValueError`` or ``TypeError`` raised
    by code of the package that defines a configured component (ours or a plugin's) while that
    component's ``__init__`` runs, or Lightning's own report of a misconfiguration.
    """
    inner = innermost(exc)
    if type(inner).__name__ == "MisconfigurationException":
        return _tidy(str(inner))
    if not isinstance(inner, (ValueError, TypeError)) and type(inner).__name__ != "RegistryError":
        return None
    frames = _frames(inner)
    if not frames:
        return None
    packages = {"hmrnn_lightning"} | {p.split(".")[0] for p in _class_paths(config)}
    raiser = frames[-1].f_globals.get("__name__", "")
    if raiser.split(".")[0] not in packages:
        return None
    component = None
    for frame in reversed(frames):  # the innermost constructor running when it was raised
        owner = frame.f_locals.get("self")
        if frame.f_code.co_name == "__init__" and owner is not None:
            component = type(owner)
            break
    if component is None:
        return None
    where = _key_of(config, component)
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
    text = re.sub(rf"^{re.escape(component.__name__)}(\.\w+)?: ", "", text)
    label = f"{where} ({component.__name__})" if where else component.__name__
    return _tidy(f"{label}: {text}")


def innermost(exc: BaseException) -> BaseException:
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or (exc.__context__ if not exc.__suppress_context__ else None)
        if nxt is None:
            break
        exc = nxt
    return exc


def _frames(exc: BaseException) -> list:
    frames, tb = [], exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    return frames


def _plain(node: Any) -> Any:
    """A jsonargparse Namespace (or anything with ``as_dict``) as plain dicts and lists."""
    if hasattr(node, "as_dict"):
        node = node.as_dict()
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node


def _walk(node: Any, key: str = ""):
    """``(key, class_path)`` of every component in a config."""
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield key, node["class_path"]
        for k, v in node.items():
            yield from _walk(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for n, v in enumerate(node):
            yield from _walk(v, f"{key}[{n}]")


def _class_paths(config: Any) -> list[str]:
    try:
        return [p for _, p in _walk(_plain(config))]
    except Exception:  # a config we cannot read must not hide the original error
        return []


def _key_of(config: Any, component: type) -> str | None:
    """Where in the config the component of this class is (the first such place)."""
    try:
        for key, path in _walk(_plain(config)):
            if path.rsplit(".", 1)[-1] == component.__name__:
                return key
    except Exception:
        return None
    return None


def report(exc: BaseException) -> None:
    """Print a user error as the one line it is."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"hmrnn: error: {text}", file=sys.stderr)
