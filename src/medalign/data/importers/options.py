"""Importer options you can discover: name, type, default and meaning, read from each importer.

An importer is a function with keyword-only options; :func:`option_specs` turns its signature
(types and defaults) plus the one-line help texts given at registration into
:class:`OptionSpec` objects. They serve three users with one definition:

* ``medalign data formats FORMAT`` prints each option with type, default and meaning;
* ``medalign data import FORMAT SRC -o OUT -O name=value ...`` parses the ``--option/-O`` values;
* :func:`check_options` validates keyword arguments from Python, so a misspelled option is a
  one-line error naming the valid ones and the nearest match instead of a raw ``TypeError``.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from medalign.data.manifest import SPLITS

# Parameters of an importer function that are not user options (the registry fills them in).
INTERNAL_PARAMETERS = frozenset({"manifest_dir"})
TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})


class OptionError(ValueError):
    """A bad importer option (unknown name, wrong type); the message is one line for the user."""


@dataclass(frozen=True)
class OptionSpec:
    """One importer option. ``kind`` is one of int, float, str, bool, choice, list, pairs, fractions."""

    name: str
    kind: str
    default: Any
    help: str
    optional: bool = False
    choices: tuple[str, ...] = ()

    @property
    def type_label(self) -> str:
        """What to type, as shown by ``data formats``."""
        labels = {
            "int": "integer",
            "float": "number",
            "str": "text",
            "bool": "true/false",
            "list": "list (comma-separated, or repeat -O)",
            "pairs": "KEY=VALUE pairs (comma-separated, or repeat -O)",
            "fractions": "train,val,test fractions (e.g. 0.8,0.1,0.1)",
        }
        if self.kind == "choice":
            return "one of " + "|".join(self.choices)
        return labels[self.kind]

    @property
    def default_label(self) -> str:
        if self.default is None:
            return "none"
        if self.default == "":
            return '""'
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, (list, tuple)):
            return ",".join(map(str, self.default)) or "none"
        return str(self.default)

    def parse(self, words: Sequence[str]) -> Any:
        """Value from the command-line texts given for this option (one per ``-O name=...``)."""
        if self.kind in ("list", "pairs"):
            items = [item.strip() for word in words for item in word.strip().strip("[]").split(",")]
            if self.kind == "list":
                return [item for item in items if item]
            return dict(_pair(item, self.name) for item in items if item)
        if len(words) > 1:
            raise OptionError(f"option {self.name} is given {len(words)} times; give it once")
        if words[0] == "" and self.optional:
            return None  # `-O name=` leaves an optional option unset
        return self.convert(words[0])

    def convert(self, value: Any) -> Any:
        """Check (and, for text from a command line or a YAML file, convert) one value."""
        if value is None:
            if self.optional:
                return None
            raise OptionError(f"option {self.name} cannot be empty ({self.type_label})")
        kind = self.kind
        if kind in ("list", "pairs") and isinstance(value, str):
            return self.parse([value])
        if kind == "int":
            return _integer(value, self.name)
        if kind == "float":
            return _number(value, self.name)
        if kind == "bool":
            return _boolean(value, self.name)
        if kind in ("str", "choice"):
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise OptionError(f"option {self.name} expects {self.type_label}, got {value!r}")
            text = str(value)
            if kind == "choice" and text not in self.choices:
                raise OptionError(
                    f"option {self.name} must be one of {', '.join(self.choices)}, got {text!r}"
                    + _nearest(text, self.choices)
                )
            return text
        if kind == "list":
            if not isinstance(value, (list, tuple)):
                raise OptionError(f"option {self.name} expects a list, got {value!r}")
            return [str(item) for item in value]
        if kind == "pairs":
            if not isinstance(value, Mapping):
                raise OptionError(f"option {self.name} expects KEY=VALUE pairs, got {value!r}")
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
        return _fractions(value, self.name)


def _pair(item: str, name: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise OptionError(f"option {name}: {item!r} is not KEY=VALUE (write KEY= to map a value to empty)")
    return key.strip(), value.strip()


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise OptionError(f"option {name} expects an integer, got {value!r}")
    try:
        number = float(value) if isinstance(value, str) and "." in value else value
        result = int(number)
        if isinstance(number, float) and number != result:
            raise ValueError
        return result
    except (TypeError, ValueError):
        raise OptionError(f"option {name} expects an integer, got {value!r}") from None


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise OptionError(f"option {name} expects a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise OptionError(f"option {name} expects a number, got {value!r}") from None


def _boolean(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    raise OptionError(f"option {name} expects yes/no (true/false), got {value!r}")


def _fractions(value: Any, name: str) -> dict[str, float]:
    """``0.8,0.1,0.1``, ``[0.8, 0.1, 0.1]`` or ``train=0.8,val=0.1,test=0.1`` -> ``{split: fraction}``."""
    if isinstance(value, str):
        items = [item.strip() for item in value.strip("[] ").split(",") if item.strip()]
        value = dict(_pair(item, name) for item in items) if any("=" in item for item in items) else items
    if isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - set(SPLITS))
        if unknown:
            raise OptionError(f"option {name}: unknown split(s) {unknown}; splits are {', '.join(SPLITS)}")
        fractions = {str(k): _number(v, name) for k, v in value.items()}
    elif isinstance(value, (list, tuple)) and len(value) == len(SPLITS):
        fractions = {split: _number(v, name) for split, v in zip(SPLITS, value, strict=True)}
    else:
        raise OptionError(f"option {name} expects three fractions for train,val,test, got {value!r}")
    if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise OptionError(f"option {name}: fractions must be >= 0 and sum to 1, got {fractions}")
    return fractions


def _kind_of(annotation: Any, name: str) -> tuple[str, bool, tuple[str, ...]]:
    """(kind, optional, choices) of a parameter annotation."""
    optional = False
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"importer option {name!r}: unsupported annotation {annotation!r}")
        annotation, args = rest[0], typing.get_args(rest[0])
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "choice", optional, tuple(str(a) for a in args)
    if annotation in (int, float, str, bool):
        return annotation.__name__, optional, ()
    if origin in (list, Sequence, tuple) or annotation in (list, tuple):
        return "list", optional, ()
    if origin in (dict, Mapping):
        value_type = args[1] if len(args) == 2 else str
        return ("fractions" if value_type is float else "pairs"), optional, ()
    raise TypeError(f"importer option {name!r}: unsupported annotation {annotation!r}")


def option_specs(fn: Callable[..., Any], helps: Mapping[str, str]) -> tuple[OptionSpec, ...]:
    """Specs of ``fn``'s keyword-only options; every option needs a help text and every text an option."""
    hints = typing.get_type_hints(fn)
    specs = []
    for parameter in inspect.signature(fn).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.name in INTERNAL_PARAMETERS:
            continue
        if parameter.name not in helps:
            raise TypeError(f"{fn.__name__}: option {parameter.name!r} has no help text")
        kind, optional, choices = _kind_of(hints[parameter.name], parameter.name)
        specs.append(
            OptionSpec(parameter.name, kind, parameter.default, helps[parameter.name], optional, choices)
        )
    extra = sorted(set(helps) - {s.name for s in specs})
    if extra:
        raise TypeError(f"{fn.__name__}: help text for unknown option(s) {extra}")
    return tuple(specs)


def _nearest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_option_error(name: str, specs: Sequence[OptionSpec], what: str) -> OptionError:
    """One line naming the valid options and the nearest one; ``name`` as the user wrote it."""
    names = [s.name for s in specs]
    close = difflib.get_close_matches(_option_key(name), names, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return OptionError(f"unknown option {name!r} for {what}; {hint}valid options: {', '.join(names)}")


def _option_key(name: str) -> str:
    """``mask-prefix``, ``--mask-prefix`` and ``mask_prefix`` all name the option ``mask_prefix``."""
    return name.strip().lstrip("-").replace("-", "_")


def check_options(options: Mapping[str, Any], specs: Sequence[OptionSpec], what: str) -> dict[str, Any]:
    """Python keyword options checked and converted by their specs (``what`` names the importer)."""
    by_name = {s.name: s for s in specs}
    checked = {}
    for name, value in options.items():
        key = _option_key(name)
        if key not in by_name:
            raise unknown_option_error(name, specs, what)
        checked[key] = by_name[key].convert(value)
    return checked


def parse_option_pairs(pairs: Sequence[str], specs: Sequence[OptionSpec], what: str) -> dict[str, Any]:
    """``name=value`` texts (one per ``--option/-O``) -> checked options.

    A list or pairs option may be repeated (its values add up); any other option is given once.
    ``name=`` leaves an optional option unset.
    """
    by_name = {s.name: s for s in specs}
    given: dict[str, list[str]] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        spec = by_name.get(_option_key(name))
        if spec is None:
            raise unknown_option_error(name.strip(), specs, what)
        if not sep:
            example = "true" if spec.kind == "bool" else "VALUE"
            raise OptionError(f"option {pair!r} of {what} is not name=value: write -O {spec.name}={example}")
        given.setdefault(spec.name, []).append(value)
    return {name: by_name[name].parse(values) for name, values in given.items()}


def describe_options(specs: Sequence[OptionSpec]) -> list[str]:
    """Lines for ``data formats FORMAT``: name, type, default, then the meaning indented below."""
    lines = []
    for spec in specs:
        lines.append(f"  {spec.name}  {spec.type_label}; default: {spec.default_label}")
        lines.append(f"      {spec.help}")
    return lines


def seeded_split_help(default: str = "0.7,0.1,0.2", when: str = "") -> dict[str, str]:
    """Help texts of the ``seed``/``fractions`` options every importer with a seeded split has."""
    suffix = f" ({when})" if when else ""
    return {
        "seed": f"seed of the patient-level split{suffix}",
        "fractions": f"train,val,test fractions of the seeded split, default {default}{suffix}",
    }
