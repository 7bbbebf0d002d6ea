"""What every verb's flags share: help that shows the defaults, old spellings kept for one release, and
``--config FILE`` / ``--print-config``.

A config file is turned into flags placed right after the verb, before the ones typed: argparse then
checks a file's values as it checks typed ones (required flags, exclusive pairs; types and choices are
checked first, so that a mistake names the file), and a typed flag, coming later, wins. PyYAML is
imported only where a file is read or printed, so that ``stfpm-ray --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stfpm_ray.errors import UserError

# Namespace entries that are not a run's configuration: how it was invoked, and how chatty it is.
_NOT_CONFIG = frozenset({"help", "command", "config", "print_config", "verbose", "quiet"})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``(default: X)`` after every flag that has one to show. Not after a None default (the help text says
    what happens then) nor after an on/off switch (off); the epilog's example lines are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class Deprecated(argparse.Action):
    """An old spelling that still works for one release: it sets the new flag's value and says on stderr
    what to write instead, so a scheduled job keeps running while its owner learns of the change."""

    def __init__(self, option_strings: list[str], dest: str, use: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **{**kwargs, "default": argparse.SUPPRESS, "help": argparse.SUPPRESS})
        self.use = use

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release; "
            f"use {self.use}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_checkpoints(parser: argparse.ArgumentParser) -> None:
    """``--checkpoints``, as the verbs that use trained models (score, nightly, calibrate) take it."""
    parser.add_argument("--checkpoints", required=True, metavar="CKPT_DIR", help="folder of <category>/ checkpoints")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file of flag values, keyed by the long flag names without -- (- or _ alike: image_size: 128; "
        "relative paths are taken from the working directory, as typed ones); flags given on the command line "
        "override it",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved configuration as YAML (a file for --config) and exit",
    )


def with_config(parser: argparse.ArgumentParser, argv: Sequence[str], start: int) -> list[str]:
    """``argv`` with the values of the ``--config`` file among ``argv[start:]`` inserted as flags at ``start``.

    Verb parsers take no abbreviations, so only ``--config`` itself names the file.
    """
    path = _config_path(argv[start:])
    if path is None or not any("--config" in action.option_strings for action in _actions(parser)):
        return list(argv)
    options = _configurable(parser)
    tokens: list[str] = []
    seen: dict[str, Any] = {}
    for key, value in _read(path).items():
        name = str(key).replace("_", "-")
        if name not in options:
            raise _config_error(path, f"unknown key {key!r}: `{parser.prog}` has no --{name}")
        if name in seen:
            raise _config_error(path, f"{key!r} and {seen[name]!r} set the same flag")
        seen[name] = key
        tokens += _flag_tokens(
            options[name], f"--{name}", value, lambda text, key=key: _config_error(path, f"{key}: {text}")
        )
    return [*argv[:start], *tokens, *argv[start:]]


def print_config(args: argparse.Namespace, resolved: Mapping[str, Any] | None = None) -> int:
    """Print every flag's value as a ``--config`` file; ``resolved`` replaces values the verb computes from
    others (a None training flag means a default that depends on the run). Returns the exit status, 0."""
    import yaml

    values = {**vars(args), **(resolved or {})}
    config = {dest.replace("_", "-"): _flag_value(value) for dest, value in values.items() if dest not in _NOT_CONFIG}
    sys.stdout.write(f"# stfpm-ray {args.command}, resolved configuration: use it with --config FILE\n")
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
    return 0


def _config_path(argv: Sequence[str]) -> str | None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    pre.add_argument("--config")
    try:
        return pre.parse_known_args(list(argv))[0].config
    except argparse.ArgumentError:  # `--config` without a file: the verb's own parser says so
        return None


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return parser._actions  # argparse has no public list of a parser's flags


def _configurable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Long flag name (without dashes) -> action, for the flags a config file may set (not deprecated ones)."""
    return {
        option[2:]: action
        for action in _actions(parser)
        if action.help is not argparse.SUPPRESS and action.dest not in _NOT_CONFIG
        for option in action.option_strings
        if option.startswith("--")
    }


def _read(path: str) -> dict[Any, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise _config_error(path, exc.strerror or str(exc)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise _config_error(path, f"not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise _config_error(path, f"expected a mapping of flag names to values, got a YAML {type(data).__name__}")
    return data


def _flag_tokens(action: argparse.Action, flag: str, value: Any, error: Callable[[str], Exception]) -> list[str]:
    """A config value as the command-line words that set it; None leaves the flag at its default."""
    if value is None:
        return []
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise error(f"expected true or false, got {value!r}")
        return [flag] if value else []
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [flag, *(_scalar(action, item, error) for item in items)]
    return [f"{flag}={_scalar(action, value, error)}"]


def _scalar(action: argparse.Action, value: Any, error: Callable[[str], Exception]) -> str:
    """One value as text, checked here against the flag's type and choices so that a bad value is reported
    with the file's name (argparse would report it as if it had been typed)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise error(f"expected a single value, got {value!r}")
    text = str(value)
    try:
        converted = action.type(text) if callable(action.type) else text
    except argparse.ArgumentTypeError as exc:  # a flag's own parser, with its own message
        raise error(f"{text!r}: {exc}") from None
    except (TypeError, ValueError):
        raise error(f"{text!r} is not a valid {getattr(action.type, '__name__', 'value')}") from None
    if action.choices is not None and converted not in action.choices:
        raise error(f"{text!r} is not one of {', '.join(map(str, action.choices))}")
    return text


def _flag_value(value: Any) -> Any:
    """A parsed value as a config file writes it: a (min, max) pair as the ``MIN,MAX`` the flag takes."""
    return ",".join(str(item) for item in value) if isinstance(value, tuple) else value


def _config_error(path: str, text: str) -> UserError:
    return UserError(f"config file {path}: {text}")
