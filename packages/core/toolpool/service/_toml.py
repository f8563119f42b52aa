"""TOML documents read by pydantic v2 models, with every mistake reported at its file, line and
key in plain words that say what to write instead, and secrets read from environment
variables or files named in the document (never from the document itself). Nothing here
knows a particular document's keys; `toolpool serve`'s configuration is built on it."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pydantic
from pydantic import BeforeValidator, PlainValidator, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from toolpool.errors import ConfigError

_M = TypeVar("_M", bound=pydantic.BaseModel)
_T = TypeVar("_T")
_KEY = r"[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'"
_KEY_LINE = re.compile(rf"^\s*((?:{_KEY})(?:\s*\.\s*(?:{_KEY}))*)\s*=")
_TABLE_LINE = re.compile(r"^\s*\[\[?\s*(.+?)\s*\]\]?\s*(#.*)?$")
_LIST = "must be a list of non-empty strings, got {}"
# pydantic's error types in plain words (those of values come from the validators below).
_SAID = {
    "missing": "is required",
    "union_tag_not_found": "is required",
    "bool_type": "must be true or false, got {got}",
    "literal_error": "must be {expected}",
    **dict.fromkeys(
        ("dict_type", "model_type", "model_attributes_type", "dataclass_type"),
        "must be a table ([{at}])",
    ),
}


def _key_path(text: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in re.findall(_KEY, text))


def lines(text: str) -> dict[tuple[str, ...], int]:
    """Where each table and key of a TOML document is written (tomllib keeps no positions)."""
    where: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    multiline: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if multiline is not None:
            multiline = None if line.count(multiline) % 2 else multiline
        elif key := _KEY_LINE.match(line):
            where.setdefault(table + _key_path(key.group(1)), number)
            multiline = next((q for q in ('"""', "'''") if line[key.end() :].count(q) % 2), None)
        elif header := _TABLE_LINE.match(line):
            table = _key_path(header.group(1))
            where.setdefault(table, number)
    return where


class Secret:
    """A secret read from an environment variable or a file. `repr()` and `str()` show only
    where it came from; `reveal()` returns the value (for the auth provider, nothing else)."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        """The secret value."""
        return self._value

    def __repr__(self) -> str:
        return f"<secret from {self.source}>"

    __str__ = __repr__


def reveal(value: Any) -> Any:
    """`value` with its secrets (in a tuple too) revealed."""
    if isinstance(value, tuple):
        return tuple(map(reveal, value))
    return value.reveal() if isinstance(value, Secret) else value


@dataclass
class Document:
    """A TOML document being read: the validation context of the validators (`doc(info)`)."""

    source: str
    text: str
    env: Mapping[str, str]  # where `<name>_env` secrets are read
    base: Path  # relative paths in the document are relative to it

    @classmethod
    def load(cls, path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Document:
        """The document in the file at `path` (its directory is the base of relative paths)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        return cls(str(path), text, os.environ if env is None else env, Path(path).parent)

    def read(self, model: type[_M]) -> _M:
        """The document validated by `model`; its first mistake as a `ConfigError`."""
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{self.source}: not valid TOML: {exc}") from None
        try:
            return model.model_validate(data, context=self)
        except pydantic.ValidationError as exc:
            raise self.located(data, exc.errors(include_url=False)[0]) from None

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        """`message` about the key at `path`, at its line (else its table's)."""
        found = map(lines(self.text).get, (path[:n] for n in range(len(path), 0, -1)))
        line = next((n for n in found if n is not None), None)
        where = f"{self.source}, line {line}" if line is not None else self.source
        return ConfigError(
            f"{where}: {'.'.join(path)}: {message}" if path else f"{where}: {message}"
        )

    def make(self, path: tuple[str, ...], keys: Collection[str], make: Callable[[], _T]) -> _T:
        """`make()`, a constructor given the table's `keys` that checks them: its `ConfigError`
        at the key it starts with, else at the last one it names, else at the table."""
        try:
            return make()
        except ConfigError as exc:
            message = re.sub(r"^\w+ '[^']*': ", "", str(exc))  # "destination 'crm': "
            lead = re.split(r"[ =]", message, maxsplit=1)[0]
            found = ((re.search(rf"\b{re.escape(k)}\b", message), k) for k in keys)
            named = [(m.start(), k) for m, k in found if m]
            key = lead if lead in keys else max(named)[1] if named else ""
            where = (*path, key) if key else path
            raise self.error(where, message.removeprefix(f"{key} ")) from None

    def located(self, data: Mapping[str, Any], err: Any) -> ConfigError:
        """A pydantic error in plain words (the first one: tables are read in their order)."""
        kind, ctx, got = err["type"], err.get("ctx", {}), err["input"]
        path: tuple[str, ...] = ()
        node: Any = data
        for seg in err["loc"]:  # union tags and "[key]" are not in the document
            if isinstance(node, dict) and seg in node:
                path, node = (*path, str(seg)), node[seg]
        if kind in ("missing", "value_error") and err["loc"][-1] not in (*path[-1:], "[key]"):
            path = (*path, str(err["loc"][-1]))  # a key left out (or its default refused)
        if kind in ("value_error", "toolpool"):  # a validator's ConfigError, or a `fault`
            return self.error((*path, *ctx.get("path", ())), str(ctx.get("error", err["msg"])))
        if "union_tag" in kind:  # a union of tables told apart by one key
            path, got = (*path, ctx["discriminator"].strip("'")), ctx.get("tag")
            tags = [t.strip("'") for t in ctx.get("expected_tags", "").split(", ")]
            close = difflib.get_close_matches(got or "", tags, n=1)
            if kind == "union_tag_invalid" and isinstance(node[path[-1]], str):
                hint = f"; did you mean {close[0]!r}?" if close else ""
                message = f"unknown {path[-2]} type {got!r}{hint} (one of {', '.join(tags)})"
                return self.error(path, message)
            if kind == "union_tag_invalid":
                return self.error(path, text_error(node[path[-1]]))
        template = _SAID.get(kind, "{msg}")
        return self.error(
            path, template.format(**ctx, got=shown(got), msg=err["msg"], at=".".join(path))
        )


def doc(info: ValidationInfo) -> Document:
    """The document a validator is reading."""
    return typing.cast(Document, info.context)


def fault(message: str, *path: str) -> PydanticCustomError:
    """A validation error about the key `path` below the value being validated."""
    return PydanticCustomError("toolpool", "{message}", {"message": message, "path": path})


def shown(value: object) -> str:
    """A value as an error may show it: short scalars as written, others by their type."""
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        return repr(value)
    return type(value).__name__


def unknown(key: str, known: Collection[str]) -> str:
    """What is said of an unknown `key`: the closest `known` one, and all of them."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (known here: {', '.join(sorted(known))})"


def only(data: _T, known: Collection[str]) -> _T:
    """`data`, if a table, has no key but the `known` ones (else a `fault` at the first)."""
    for key in data if isinstance(data, dict) else ():
        if key not in known:
            raise fault(unknown(key, known), key)
    return data


def keys_of(cls: Any) -> Any:
    """A validator refusing keys that are no field of the dataclass `cls` (a pydantic model
    does it itself: `Table`)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return BeforeValidator(lambda value: only(value, known))


def must(message: str, ok: Callable[[Any], Any], then: Any = PlainValidator) -> Any:
    """A validator: a value `ok` accepts, else `message` (formatted with the value shown)."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ConfigError(message.format(shown(value)))
        return value

    return then(check)


def number(value: Any, low: float, high: float = math.inf, whole: bool = False) -> bool:
    """A number (not a bool; an int if `whole`) with `low <= value < high`."""
    kind = int if whole else int | float
    return isinstance(value, kind) and not isinstance(value, bool) and low <= value < high


def text_error(value: Any, pattern: str = "", says: str = "", says_all: bool = False) -> str:
    """Why `value` is no non-empty string matching `pattern` (`says`, also for a value that
    is no string if `says_all`); "" if it is one."""
    if (not isinstance(value, str) or not value) and not says_all:
        return f"must be a non-empty string, got {shown(value)}"
    if not isinstance(value, str) or (pattern and not re.match(pattern, value)):
        return says.format(shown(value))
    return ""


def text(pattern: str = "", says: str = "", says_all: bool = False) -> Any:
    """A validator of a non-empty string (that matches `pattern`, else the error is `says`)."""

    def check(value: Any) -> str:
        if why := text_error(value, pattern, says, says_all):
            raise ConfigError(why)
        return typing.cast(str, value)

    return PlainValidator(check)


def strings(value: Any, pattern: str = "", says: str = "") -> tuple[str, ...]:
    """A list of non-empty strings (each matching `pattern`, else `says`), as a tuple."""
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(_LIST.format(shown(value)))
    if why := next(filter(None, (text_error(v, pattern, says) for v in value)), ""):
        raise ConfigError(why)
    return tuple(value)


def texts(pattern: str = "", says: str = "") -> Any:
    """A validator of `strings`."""
    return PlainValidator(lambda value: strings(value, pattern, says))


def one_of(choices: Mapping[str, Callable[[], Any]]) -> Any:
    """A validator of one of the `choices`' names: the value is what the name's function makes."""

    def check(value: Any) -> Any:
        if not isinstance(value, str) or value not in choices:
            raise ConfigError(f"must be one of {', '.join(map(repr, choices))}, got {shown(value)}")
        return choices[value]()

    return PlainValidator(check)


def plugin(spec: Any, options: Mapping[str, Any], methods: Collection[str], says: str) -> Any:
    """What the factory named by `spec` ("package.module:factory") makes of `options`; a
    `ConfigError` if `spec` is no such name (`says`), or the factory fails, or what it makes
    lacks one of `methods`."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(says)
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {spec!r}: {exc}") from None
    try:
        made = factory(**options)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{spec}(**options) failed: {exc}") from None
    for method in methods:
        if not callable(getattr(made, method, None)):
            raise ConfigError(f"{spec} returned an object without {method}()")
    return made


def path(
    kind: str = "file", says: str = "{} is not a file; fix the path"
) -> Callable[[Any, ValidationInfo], str]:
    """A validator of a path relative to the document's directory: an existing file (or, with
    `kind="any"`, anything that exists); the absolute path as a string."""

    def check(value: Any, info: ValidationInfo) -> str:
        if why := text_error(value):
            raise ConfigError(why)
        found = doc(info).base / value
        if not (found.is_file() if kind == "file" else found.exists()):
            raise ConfigError(says.format(found))
        return str(found)

    return check


class Table(pydantic.BaseModel):
    """One TOML table. Keys that are no field are refused, naming the closest known one,
    unless `passed_on` (they go, as written, to a constructor that checks them: `options`) or
    `refused` (with their own message). The secret `secret_name`, if the table has one, is
    read from `<name>_env` or `<name>_file` into the field `secret`."""

    model_config = pydantic.ConfigDict(extra="allow", frozen=True, arbitrary_types_allowed=True)
    secret_name: ClassVar[str] = ""
    secret_required: ClassVar[bool] = False
    passed_on: ClassVar[Collection[str]] = ()
    refused: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _secret(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and (base := cls.secret_name):
            secret = _read_secret(doc(info), data, base, cls.secret_required)
            data = {k: v for k, v in data.items() if k not in (f"{base}_env", f"{base}_file")}
            data["secret"] = secret
        return data

    @model_validator(mode="after")
    def _keys(self) -> typing.Self:
        base = self.secret_name
        secret = (f"{base}_env", f"{base}_file") if base else ()
        known = {*type(self).model_fields, *secret, *self.passed_on} - {"secret"}
        for key in self.model_extra or ():
            if key in self.refused:
                raise fault(self.refused[key], key)
        only(self.model_extra, known)
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The `passed_on` keys given: those that are fields as read, others as written."""
        given = self.model_fields_set & set(self.passed_on)
        return {**{k: getattr(self, k) for k in given}, **(self.model_extra or {})}


def _read_secret(doc: Document, data: Mapping[str, Any], base: str, required: bool) -> Any:
    env_key, file_key = f"{base}_env", f"{base}_file"
    if base in data:
        raise fault(
            f"secrets are never written in the config file (it ends up in repositories "
            f'and logs); write {base}_env = "VARIABLE" (an environment variable) or '
            f'{base}_file = "/run/secrets/..." (a file holding only the secret)',
            base,
        )
    if env_key in data and file_key in data:
        raise fault(f"give {env_key} or {file_key}, not both", env_key)
    if env_key in data:
        if text_error(name := data[env_key]):
            raise fault("must name an environment variable", env_key)
        if not doc.env.get(name):
            why = "is not set (or empty); export it before starting the service"
            raise fault(f"environment variable {name} {why}", env_key)
        return Secret(doc.env[name], f"${name}")
    if file_key in data:
        if text_error(data[file_key]):
            raise fault("must be a file path", file_key)
        try:
            value = (found := doc.base / data[file_key]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            why = f"cannot read {found} ({exc.strerror or exc}); fix the path"
            raise fault(why, file_key) from None
        if not value:
            raise fault(f"{found} is empty; it must hold the secret", file_key)
        return Secret(value, str(found))
    if required:
        raise fault(f'needs {env_key} = "VARIABLE" or {file_key} = "PATH"')
    return None
