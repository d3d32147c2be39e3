"""What every request type is made of: settings with their checks, defaults and help in one
place, read from a job's JSON (`Request.from_json`) and written back (`Request.to_json`).

A setting is a dataclass field made by `setting`: its check (a `Check`), its choices, whether
the job sets it itself (an output path) and whether the command line has it. The command line
builds its options from the same fields (`core.cli.add_request_arguments`), so a job accepts
exactly what the command accepts, with the same defaults and the same messages.

Nothing here imports torch: the run store reads the request types to check a job's kind, and
choices that live in the engine are callables resolved when a request is checked.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from core.errors import DefectPruneError

R = TypeVar("R", bound="Request")


class ParameterError(DefectPruneError):
    """A request's settings (a job's parameters) are not what its kind accepts."""


@dataclass(frozen=True)
class Check:
    """How a setting's text becomes its value (``convert``) and what the value must be
    (``problem`` says why not, or None). The command line and a job's JSON both go through
    it, so both say the same thing about the same bad value."""

    convert: Callable[[str], Any]
    what: str  # "a whole number": in "'x' is not a whole number"
    problem: Callable[[Any], str | None] = lambda value: None

    def parse(self, text: str) -> Any:
        try:
            value = self.convert(text)
        except ValueError:
            raise ParameterError(f"{text!r} is not {self.what}") from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        problem = self.problem(value)
        if problem:
            raise ParameterError(problem)


def number(convert: type, what: str, ok: Callable[[Any], bool], requirement: str) -> Check:
    """A number that must be ``requirement`` (``ok``)."""
    return Check(convert, what, lambda value: None if ok(value) else f"{value} must be {requirement}")


def _workers_problem(value: int) -> str | None:
    """``--workers``: 0 up to the cap (each worker is a process with its own copy of the data)."""
    from core.config import max_workers

    if value < 0:
        return f"{value} must be 0 or more"
    cap = max_workers()
    if value > cap:
        return (f"{value} data-loader workers is more than the limit of {cap} "
                "(the CPU count; set DEFECTPRUNE_MAX_WORKERS to change it)")
    return None


WHOLE_NUMBER = Check(int, "a whole number")
POSITIVE_INT = number(int, "a whole number", lambda v: v >= 1, "at least 1")
NON_NEGATIVE_INT = number(int, "a whole number", lambda v: v >= 0, "0 or more")
NON_NEGATIVE_FLOAT = number(float, "a number", lambda v: v >= 0, "0 or more")
FRACTION = number(float, "a number", lambda v: 0.0 < v < 1.0, "between 0 and 1 (e.g. 0.8 = 80% fewer)")
UNIT_INTERVAL = number(float, "a number", lambda v: 0.0 <= v <= 1.0, "from 0 to 1")
WORKERS = Check(int, "a whole number", _workers_problem)
# Seeds feed NumPy and torch generators, which take 0 .. 2**32 - 1 (NumPy refuses a negative
# seed with a traceback, torch wraps a huge one silently).
SEED = number(int, "a whole number", lambda v: 0 <= v < 2**32, "from 0 to 4294967295")
# `float` alone lets nan and inf through, which every comparison then accepts
FINITE_FLOAT = number(float, "a number", math.isfinite, "a finite number")
NON_NEGATIVE_FINITE = number(float, "a number", lambda v: math.isfinite(v) and v >= 0, "0 or more")
POSITIVE_FLOAT = number(float, "a number", lambda v: 0 < v < float("inf"), "a positive number")

# how a setting is given: one value, a flag (true/false), KEY=VALUE options, a list of values
VALUE, FLAG, OPTIONS, LIST = "value", "flag", "options", "list"


def setting(default: Any = dataclasses.MISSING, *, check: Check | None = None,
            choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None, help: str | Callable[[], str] = "",
            kind: str = VALUE, required: bool = False, job: bool = True, cli: bool = True,
            exclusive: str | None = None, metavar: str | None = None,
            default_factory: Callable[[], Any] | None = None) -> Any:
    """A request field. ``job=False``: the job sets it (an output path) and refuses it in its
    parameters; ``cli=False``: the command line has no option for it; ``exclusive``: at most
    one of the fields naming the same group is given; ``choices`` may be a callable (the
    engine's registries import torch: resolved when a request is checked)."""
    metadata = {"check": check, "choices": choices, "help": help, "kind": kind, "required": required,
                "job": job, "cli": cli, "exclusive": exclusive, "metavar": metavar}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    if kind in (OPTIONS, LIST) and default is dataclasses.MISSING:
        return dataclasses.field(default_factory=dict if kind == OPTIONS else tuple, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    """The command-line option of a field (``batch_size`` -> ``--batch-size``)."""
    return "--" + field.name.replace("_", "-")


def choices_of(field: dataclasses.Field) -> list[Any] | None:
    choices = field.metadata.get("choices")
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return None if field.default is dataclasses.MISSING else field.default


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings -> options; VALUE is JSON where it parses, else the text."""
    from core import safe_json
    from core.data.base import InvalidOptionError
    from core.safe_json import JSONLimitError

    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidOptionError(f"--option {item!r} is not KEY=VALUE, e.g. --option category=bottle")
        try:
            options[key.strip()] = safe_json.loads(value, f"--option {key.strip()}", InvalidOptionError)
        except JSONLimitError:
            raise
        except InvalidOptionError:  # not JSON at all: the text itself (category=bottle)
            options[key.strip()] = value
    return options


@dataclass(frozen=True, kw_only=True)
class Request:
    """A typed request: its fields are its settings (`setting`), checked when it is made."""

    KIND: ClassVar[str] = ""  # the job kind (or command) it is the request of: named in its messages

    def __post_init__(self) -> None:
        groups: dict[str, list[dataclasses.Field]] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            meta = field.metadata
            try:
                _check_value(field, value)
            except ParameterError as exc:
                raise ParameterError(f"argument {flag_of(field)}: {exc}") from None
            if meta.get("exclusive"):
                groups.setdefault(meta["exclusive"], []).append(field)
        for given in groups.values():
            # a member at its default (the group's default choice, e.g. --target-macs 0.8) yields
            # to another member given: it is unset (None) then; two others given is an error
            at_default = [f for f in given if getattr(self, f.name) == default_of(f)]
            chosen = [f for f in given if f not in at_default]
            if len(chosen) > 1:
                raise ParameterError(f"argument {flag_of(chosen[1])}: not allowed with argument {flag_of(chosen[0])}")
            for field in at_default if chosen else at_default[1:]:
                object.__setattr__(self, field.name, None)

    @classmethod
    def job_fields(cls) -> list[dataclasses.Field]:
        """The fields a job's parameters may hold (not those the job sets itself)."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("job", True)]

    @classmethod
    def has_field(cls, name: str) -> bool:
        return any(f.name == name for f in dataclasses.fields(cls))

    @classmethod
    def from_json(cls: type[R], params: Any, **job_set: Any) -> R:
        """The request a job's JSON parameters stand for, with the fields the job sets itself
        (``job_set``: its output paths) filled in. Anything the command would refuse is a
        `ParameterError` naming the parameter, in one line."""
        kind = cls.KIND
        if not isinstance(params, dict):
            raise ParameterError(f"{kind} job parameters must be a JSON object, not {type(params).__name__}")
        fields = {f.name: f for f in cls.job_fields()}
        values: dict[str, Any] = {}
        for key, value in params.items():
            field = fields.get(key)
            if field is None:
                raise ParameterError(f"unknown parameter {key!r} for a {kind} job; known: {', '.join(sorted(fields))}")
            values[key] = _from_json_value(kind, field, value)
        try:
            missing = [flag_of(f) for f in fields.values() if f.metadata.get("required") and values.get(f.name) is None]
            if missing:
                raise ParameterError(f"the following arguments are required: {', '.join(missing)}")
            return cls(**{k: v for k, v in values.items() if v is not None}, **job_set)
        except ParameterError as exc:
            raise ParameterError(f"{kind} job parameters: {exc} (parameters are the command's options with _ for "
                                 "-, e.g. batch_size)") from None

    def to_json(self) -> dict[str, Any]:
        """The request as a job stores it: every setting a job takes, but those left unset
        (None), which the job leaves to their default again when it is read back."""
        out: dict[str, Any] = {}
        for field in self.job_fields():
            value = getattr(self, field.name)
            if value is None:
                continue
            out[field.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) \
                else value
        return out


def _check_value(field: dataclasses.Field, value: Any) -> None:
    meta = field.metadata
    kind = meta.get("kind", VALUE)
    if kind == OPTIONS:
        if not isinstance(value, dict):
            raise ParameterError(f"must be KEY=VALUE options (a JSON object), not {value!r}")
        return
    items = value if kind == LIST else [value]
    for item in items:
        if kind == FLAG and not isinstance(item, bool):
            raise ParameterError(f"must be true or false, not {item!r}")
        if meta.get("check") is not None:
            meta["check"].check(item)
        choices = choices_of(field)
        if choices is not None and item not in choices:
            raise ParameterError(f"invalid choice: {item!r} (choose from {', '.join(map(repr, choices))})")


def _from_json_value(kind: str, field: dataclasses.Field, value: Any) -> Any:
    """A JSON value as the field holds it. Scalars go through their text, as on the command
    line (``"64"`` and ``64`` are the same size, ``3.0`` is not a whole number)."""
    meta = field.metadata
    shape = meta.get("kind", VALUE)
    if shape == FLAG:
        if not isinstance(value, bool):
            raise ParameterError(f"{kind} job parameter {field.name} must be true or false, not {value!r}")
        return value
    if value is None:
        return None
    if shape == OPTIONS:  # an object; KEY=VALUE strings as on the command line also do
        return dict(value) if isinstance(value, dict) else parse_options(
            [str(v) for v in (value if isinstance(value, list) else [value])])
    if shape == LIST:
        return tuple(_scalar(kind, field, v) for v in (value if isinstance(value, list) else [value]))
    return _scalar(kind, field, value)


def _scalar(kind: str, field: dataclasses.Field, value: Any) -> Any:
    if isinstance(value, (dict, list)):
        raise ParameterError(f"{kind} job parameter {field.name} must be a single value, not {value!r}")
    check = field.metadata.get("check")
    if check is None:
        return str(value)
    try:
        return check.parse(str(value))
    except ParameterError as exc:
        raise ParameterError(f"{kind} job parameters: argument {flag_of(field)}: {exc} (parameters are the "
                             "command's options with _ for -, e.g. batch_size)") from None
