"""Compose YAML parts, apply ``--override key.path=value`` and validate.

An experiment file lists its parts under ``defaults`` (paths relative to the file's
folder or to any folder above it, ``.yaml`` optional); parts are merged in order, then
the file's own keys, then the overrides (values parsed as YAML). Every leaf remembers
the file it came from, so a validation error names the dotted key, the file and the
closest valid key, in one line (torchtune ``config/_parse.py`` and nanoGPT's loud
"unknown config key" are the models).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from strato_peft.config.schema import ExperimentConfig

OVERRIDE_SOURCE = "--override"


class ConfigError(Exception):
    """A configuration problem, reported to the user as one line."""


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def _find_part(entry: str, including: Path) -> Path:
    name = entry if entry.endswith((".yaml", ".yml")) else f"{entry}.yaml"
    for folder in (including.parent, *including.parent.parents):
        candidate = folder / name
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(
        f"{including}: part '{entry}' listed in 'defaults' not found "
        f"(looked for {name} in {including.parent} and the folders above it)"
    )


Origin = Callable[[str], str]


def _merge(
    base: dict[str, Any],
    update: dict[str, Any],
    sources: dict[str, str],
    origin: Origin,
    prefix: str = "",
) -> None:
    """Deep-merge ``update`` into ``base``; ``origin(dotted_key)`` names where a leaf came from."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            sources.setdefault(dotted, origin(dotted))
            _merge(base[key], value, sources, origin, f"{dotted}.")
            continue
        base[key] = copy.deepcopy(value)
        for stale in [k for k in sources if k.startswith(f"{dotted}.")]:
            del sources[stale]
        sources[dotted] = origin(dotted)
        if isinstance(value, dict):
            _merge({}, value, sources, origin, f"{dotted}.")


def _lookup(part_sources: dict[str, str]) -> Origin:
    return lambda key: part_sources.get(key, "")


def _compose(path: Path, sources: dict[str, str], stack: tuple[Path, ...]) -> dict[str, Any]:
    """Merge a file's ``defaults`` parts, then its own keys; fill ``sources``."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ConfigError(f"circular 'defaults': {chain}")
    data = _read_yaml(path)
    parts = data.pop("defaults", [])
    if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
        raise ConfigError(f"{path}: 'defaults' must be a list of part names, got {parts!r}")
    merged: dict[str, Any] = {}
    for entry in parts:
        part_sources: dict[str, str] = {}
        part = _compose(_find_part(entry, path), part_sources, (*stack, path))
        _merge(merged, part, sources, _lookup(part_sources))
    _merge(merged, data, sources, lambda _k: str(path))
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``key.path=value`` into the key path and the YAML-parsed value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--override '{text}': expected key.path=value, e.g. peft.rank=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--override '{text}': value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str], sources: dict[str, str]) -> None:
    """Apply ``key.path=value`` strings in order (the last one wins)."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"--override '{text}': '{where}' is a value, not a section")
            node = child
        prefix = ".".join(path[:-1])
        _merge(
            node,
            {path[-1]: value},
            sources,
            lambda _k: OVERRIDE_SOURCE,
            f"{prefix}." if prefix else "",
        )


def _valid_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """Field names (and aliases) valid at ``loc``'s parent section."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or not isinstance(part, str) or part not in fields:
            return []
        annotation = fields[part].annotation
        current = _model_of(annotation)
        if current is None:
            return []
    fields = getattr(current, "model_fields", {})
    names = [info.alias or name for name, info in fields.items()]
    return sorted(names)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _source_of(dotted: str, sources: dict[str, str], default: str) -> str:
    probe = dotted
    while probe:
        if sources.get(probe):
            return sources[probe]
        probe = probe.rpartition(".")[0]
    return default


def format_validation_error(exc: ValidationError, sources: dict[str, str], default: str) -> str:
    """One line naming the dotted key, where it was set, and the closest valid key."""
    # An unknown key first: a misspelt key also shows up as the real key "missing".
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    err = errors[0]
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "<root>"
    where = _source_of(dotted, sources, default)
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    if err["type"] == "extra_forbidden":
        valid = _valid_keys(ExperimentConfig, loc)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.4)
        parent = ".".join(str(p) for p in loc[:-1])
        suggestion = f"{parent}.{close[0]}" if parent and close else (close[0] if close else "")
        hint = f"; did you mean '{suggestion}'?" if suggestion else ""
        return f"{where}: unknown key '{dotted}'{hint} (valid here: {', '.join(valid)}){extra}"
    if err["type"] == "missing":
        return f"{where}: missing required key '{dotted}'{extra}"
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return f"{where}: invalid value for '{dotted}': {message}{shown}{extra}"


def load_config(
    path: str | Path,
    overrides: list[str] | None = None,
    seed: int | None = None,
) -> ExperimentConfig:
    """Compose, override and validate an experiment config.

    Raises:
        ConfigError: with a one-line message naming the key, the file and a suggestion.
    """
    path = Path(path)
    sources: dict[str, str] = {}
    tree = _compose(path, sources, ())
    apply_overrides(tree, overrides or [], sources)
    if seed is not None:
        _merge(tree, {"seed": seed}, sources, lambda _k: "--seed")
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, sources, str(path.resolve()))) from None


def resolved_yaml(config: ExperimentConfig) -> str:
    """The resolved config as YAML, loadable again by :func:`load_config`."""
    data = config.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False)
