"""Reading the settings: each field as the loader and the CLI see it (`SETTING_FIELDS`), a
raw value converted to its field's type with an error that names the setting and its
origin, and the layers `load_settings` stacks: defaults < `nightshift.toml` < environment
variables < command-line flags (services.settings declares the fields).
"""

from __future__ import annotations

import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import msgspec
from msgspec import Meta

from services.settings import CASE_FREE_SETTINGS, Settings, SettingsError


class SettingField(NamedTuple):
    """One setting as the loader and the CLI see it."""

    name: str
    type: Any  # the annotated type: what msgspec converts a raw value to, constraints included
    base: Any  # the type without its constraints: str, int, float or a Literal
    default: Any
    description: str
    choices: tuple[str, ...]  # the Literal's values; empty for a free value


def _describe_fields() -> Mapping[str, SettingField]:
    hints = typing.get_type_hints(Settings, include_extras=True)
    out: dict[str, SettingField] = {}
    for f in msgspec.structs.fields(Settings):
        annotated = hints[f.name]
        base, *extras = typing.get_args(annotated) or (annotated,)
        description = next(
            (m.description for m in extras if isinstance(m, Meta) and m.description), ""
        )
        choices = typing.get_args(base) if typing.get_origin(base) is Literal else ()
        out[f.name] = SettingField(f.name, annotated, base, f.default, description, choices)
    return MappingProxyType(out)


SETTING_FIELDS: Mapping[str, SettingField] = _describe_fields()


def convert_setting(name: str, raw: Any, origin: str, *, strict: bool = False) -> Any:
    """`raw` (a toml value, an environment string, a flag) as the field's type, or a
    SettingsError that names the setting, where `raw` came from and, for a choice, the
    values allowed. Lax by default: text from the environment or a flag is parsed."""
    field = SETTING_FIELDS.get(name)
    if field is None:
        raise SettingsError(f"unknown setting {name!r} from {origin}")
    if name in CASE_FREE_SETTINGS and isinstance(raw, str):
        raw = raw.lower()
    try:
        if isinstance(raw, str) and typing.get_origin(field.base) is list:
            return msgspec.json.decode(raw, type=field.type)  # a list from the env is JSON
        return msgspec.convert(raw, type=field.type, strict=strict)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        why = str(exc).replace("`", "")
        if field.choices:
            why += f" (allowed: {', '.join(repr(c) for c in field.choices)})"
        raise SettingsError(f"setting {name!r} from {origin}: {why}") from None


def _from_file(path: Path, named: bool) -> dict[str, Any]:
    """The toml layer. A missing default file is no layer; a missing named one is an error."""
    if not path.is_file():
        if named:
            raise SettingsError(f"$NIGHTSHIFT_CONFIG names {path}, which is not a file")
        return {}
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: {exc}") from None
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in SETTING_FIELDS:
            raise SettingsError(f"unknown setting {key!r} in {path}")
        values[key] = convert_setting(key, raw, str(path))
    return values


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    """The environment layer: `NATS_URL`, then `NIGHTSHIFT_<NAME>`; empty values are unset."""
    values: dict[str, Any] = {}
    if env.get("NATS_URL"):
        values["nats_url"] = convert_setting("nats_url", env["NATS_URL"], "$NATS_URL")
    for name in SETTING_FIELDS:
        var = f"NIGHTSHIFT_{name.upper()}"
        if env.get(var):
            values[name] = convert_setting(name, env[var], f"${var}")
    return values


def load_settings(
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    config_file: str | Path | None = None,
) -> Settings:
    """Build the settings from the file, the environment and explicit overrides (flags);
    an override of None is no override (a flag not given)."""
    env = dict(os.environ) if env is None else env
    named = config_file is None and bool(env.get("NIGHTSHIFT_CONFIG"))
    path = Path(config_file or env.get("NIGHTSHIFT_CONFIG") or "nightshift.toml")
    values = _from_file(path, named)
    values.update(_from_env(env))
    for name, raw in (overrides or {}).items():
        if raw is not None:
            values[name] = convert_setting(name, raw, "the command line")
    return Settings(**values)


def validate_settings(s: Settings) -> None:
    """Check settings built in code (not by `load_settings`) against the fields' types."""
    for name in SETTING_FIELDS:
        convert_setting(name, getattr(s, name), "the settings object", strict=True)
