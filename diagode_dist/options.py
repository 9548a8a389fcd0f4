"""Training options: one frozen dataclass with the defaults and checks of every option.

``TrainOptions`` is used by ``dd.fit``, ``submit`` / ``fit_distributed``, the ``[train]`` table
of a TOML config and the command-line flags of ``diagode-dist demo`` / ``train``; the config's key
table and the flags are derived from its fields. Adding an option is one field here (default,
check, help) plus its use where it acts::

    import diagode_dist as dd
    options = dd.TrainOptions(epochs=20, lr=0.1)
    theta, history = dd.fit(prob, theta0, options=options)          # or keyword arguments
    theta, history = dd.fit(prob, theta0, epochs=20, lr=0.1)

Fields marked ``service`` only matter on a Dask cluster (``fit`` ignores them in an options
object and refuses them as keyword arguments).
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from diagode_dist.adjoint import DEFAULT_RTOL
from diagode_dist.param import ExpParam, SoftplusParam, check_param
from diagode_dist.rational import DEFAULT_METHOD, METHODS

__all__ = ["TrainOptions", "DEMO_OPTIONS", "PARAMS", "option_fields", "add_option_flags",
           "options_from_flags", "with_options", "takes_options"]

PARAMS = {"softplus": SoftplusParam, "exp": ExpParam}


# ---- checks: each returns the cleaned value or raises naming the option ------------------------

def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value}")
    return number


def _int_at_least(minimum: int) -> Callable[[str, Any], int]:
    return lambda name, value: _integer(name, value, minimum)


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


def _positive(name: str, value: Any) -> float:
    number = _number(name, value)
    if not number > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return number


def _nonnegative(name: str, value: Any) -> float:
    number = _number(name, value)
    if not number >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return number


def _fraction(name: str, value: Any) -> float:
    number = _number(name, value)
    if not 0 < number < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value}")
    return number


def _interval(name: str, value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") \
            or len(value) != 2:
        raise TypeError(f"{name} must be a list [low, high] (or None), got {value!r}")
    low, high = (_number(name, item) for item in value)
    if not low < high:
        raise ValueError(f"{name} must have low < high, got {list(value)!r}")
    return (low, high)


def _param(name: str, value: Any):
    if isinstance(value, str):
        if value not in PARAMS:
            raise ValueError(f"{name} must be one of {', '.join(PARAMS)}, got {value!r}")
        return value
    try:
        check_param(value)
    except TypeError as err:
        raise TypeError(f"{name} must be one of {', '.join(PARAMS)} or a diagonal map: {err}") \
            from None
    return value


def _method(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in METHODS:
        raise ValueError(f"{name} must be one of {', '.join(METHODS)}, got {value!r}")
    return value


def _option(default: Any, check: Callable[[str, Any], Any], help: str, *, flag: str = "one",
            service: bool = False, metavar: str | None = None,
            choices: tuple[str, ...] = ()):
    """A field of TrainOptions: its default, its check, its help text and how it is flagged.

    flag: "one" (one value on the command line), "pair" (two values), "choice" (one of
    ``choices``). service: True for options that only the Dask service uses.
    """
    return field(default=default, metadata={"check": check, "help": help, "flag": flag,
                                            "service": service, "metavar": metavar,
                                            "choices": choices})


@dataclass(frozen=True)
class TrainOptions:
    """Options of a training run, checked when built (TypeError/ValueError naming the option)."""

    epochs: int = _option(20, _int_at_least(1), "passes over the columns")
    lr: float = _option(1e-3, _positive, "Adam step size")
    k: int = _option(30, _int_at_least(1), "Krylov dimension per step")
    batch_size: int = _option(32, _int_at_least(1), "columns per optimiser step")
    weight_decay: float = _option(0.0, _nonnegative, "L2 coefficient added to the gradient")
    clamp: tuple[float, float] | None = _option(
        (-50.0, 50.0), _interval, "bounds of theta after each step", flag="pair",
        metavar=("LOW", "HIGH"))
    seed: int = _option(0, _int_at_least(0), "minibatch permutation seed")
    rtol: float = _option(DEFAULT_RTOL, _fraction,
                          "relative accuracy of each column's Krylov solution, in (0, 1)")
    max_chunk_columns: int | None = _option(
        None, _optional(_int_at_least(1)), "columns per computed chunk (default: from memory)")
    param: Any = _option("softplus", _param,
                         "diagonal map: softplus (d = -softplus theta) or exp (d = -exp theta)",
                         flag="choice", choices=tuple(PARAMS))
    method: str = _option(
        DEFAULT_METHOD, _method,
        "Krylov spaces: polynomial (matrix-free), rational (shift-and-invert, one sparse "
        "factorization per step: stiff sparse A0) or auto (by an a-priori cost model)",
        flag="choice", choices=METHODS)
    log_every: int = _option(0, _int_at_least(0),
                             "log the mean loss every N steps (0: never)")
    n_shards: int | None = _option(None, _optional(_int_at_least(1)),
                                   "column shards (default: one per worker)", service=True)
    checkpoint_every: int = _option(10, _int_at_least(1), "steps between checkpoints",
                                    service=True)
    step_timeout: float = _option(300.0, _positive,
                                  "seconds a step may take before the run fails", service=True)

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = spec.metadata["check"](spec.name, getattr(self, spec.name))
            object.__setattr__(self, spec.name, value)

    def diagonal_map(self):
        """The diagonal map object (``SoftplusParam()`` for "softplus", ...)."""
        return PARAMS[self.param]() if isinstance(self.param, str) else self.param

    def to_wire(self) -> dict[str, Any]:
        """Plain values (msgpack/JSON) of every option but ``param``, which stays with the shards
        (the parameter server never applies the diagonal map)."""
        values = {spec.name: getattr(self, spec.name) for spec in fields(self)
                  if spec.name != "param"}
        values["clamp"] = None if self.clamp is None else list(self.clamp)
        return values

    @classmethod
    def from_wire(cls, values: Any) -> TrainOptions:
        """Options from ``to_wire``'s dict, checked as when built (unknown keys refused)."""
        if not isinstance(values, Mapping):
            raise TypeError(f"options must be a mapping, got {type(values).__name__}")
        return with_options("TrainOptions.from_wire", None, dict(values), exclude=("param",))

    def describe(self) -> dict[str, Any]:
        """Plain values of every option, ``param`` by name (for summaries)."""
        name = self.param if isinstance(self.param, str) else type(self.param).__name__
        return {**self.to_wire(), "param": name}


# The demo problem's options: the README, ``diagode-dist demo`` and deploy/local use these.
DEMO_OPTIONS = TrainOptions(epochs=20, lr=0.1, k=30, batch_size=32, seed=0)


def option_fields(service: bool = True) -> list:
    """The dataclass fields of TrainOptions (without the service-only ones if ``service`` is
    False)."""
    return [spec for spec in fields(TrainOptions) if service or not spec.metadata["service"]]


def with_options(caller: str, options: TrainOptions | None, kwargs: dict[str, Any],
                 service: bool = True, exclude: tuple[str, ...] = ()) -> TrainOptions:
    """``options`` (default ``TrainOptions()``) with ``kwargs`` replacing some fields.

    An unknown keyword is a TypeError in ``caller``'s name, with the closest option suggested.
    """
    if options is not None and not isinstance(options, TrainOptions):
        raise TypeError(f"{caller}(): options must be a TrainOptions, got "
                        f"{type(options).__name__}")
    allowed = [spec.name for spec in option_fields(service) if spec.name not in exclude]
    for name in kwargs:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if not service and name in {spec.name for spec in option_fields()}:
                hint = " (a Dask service option: see fit_distributed)"
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}{hint}")
    return replace(options if options is not None else TrainOptions(), **kwargs)


def takes_options(service: bool):
    """Decorator: the function's ``**options`` keywords are the fields of TrainOptions, and its
    signature (``help()``, ``inspect.signature``) lists them with their defaults."""

    def decorate(function):
        signature = inspect.signature(function)
        parameters = [p for p in signature.parameters.values()
                      if p.kind is not inspect.Parameter.VAR_KEYWORD]
        taken = {p.name for p in parameters}
        defaults = TrainOptions()
        parameters += [inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY,
                                         default=getattr(defaults, spec.name))
                       for spec in option_fields(service) if spec.name not in taken]
        function.__signature__ = signature.replace(parameters=parameters)
        return function

    return decorate


# ---- command-line flags ----------------------------------------------------------------------

def _flag_type(spec) -> Callable[[str], Any]:
    """argparse type of one option: parse the text, then the option's own check."""
    check = spec.metadata["check"]

    def parse(text: str):
        value: Any = text
        if spec.metadata["flag"] != "choice":
            try:
                value = float(text) if any(c in text for c in ".eEn") else int(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if spec.metadata["flag"] == "pair":
            return value
        try:
            return check(spec.name, value)
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = spec.name  # argparse names the type in its messages
    return parse


def add_option_flags(parser: argparse.ArgumentParser, defaults: TrainOptions | None = None,
                     service: bool = True) -> None:
    """One flag per option (``--batch-size N``, ``--clamp LOW HIGH``, ...).

    defaults: shown in the help and used when a flag is absent; None leaves absent flags out
    of the namespace (so they do not override a config file).
    """
    group = parser.add_argument_group("training options" + (
        "" if defaults is not None else " (override the config's [train] table)"))
    for spec in option_fields(service):
        flag = "--" + spec.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f"option_{spec.name}", "type": _flag_type(spec),
                                  "help": spec.metadata["help"],
                                  "metavar": spec.metadata["metavar"]
                                  or ("N" if "int" in str(spec.type) else "X")}
        if spec.metadata["flag"] == "pair":
            kwargs.update(nargs=2, metavar=spec.metadata["metavar"])
        if spec.metadata["flag"] == "choice":
            choices = spec.metadata["choices"]
            kwargs.update(choices=choices, type=str, metavar="{" + ",".join(choices) + "}")
        if defaults is None:
            kwargs["default"] = argparse.SUPPRESS
        else:
            kwargs["default"] = getattr(defaults, spec.name)
            if kwargs["default"] is not None and spec.name != "clamp":
                kwargs["help"] += " (default: %(default)s)"
        group.add_argument(flag, **kwargs)


def options_from_flags(args: argparse.Namespace, base: TrainOptions,
                       where: str = "") -> TrainOptions:
    """``base`` with the options given as flags (see ``add_option_flags``)."""
    given = {name[len("option_"):]: value for name, value in vars(args).items()
             if name.startswith("option_")}
    try:
        return replace(base, **given)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{where}{err}") from None
