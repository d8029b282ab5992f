"""The plugin's flags as every launcher and host plugin reads them: one HfArgumentParser over every registered
method's config and the language monitor, in the upstreams' own dialect (one definition per flag)."""
from __future__ import annotations

import dataclasses


def options_parser(prog: str, description: str, extra: tuple = ()):
    """The plugin's own flags (every registered method's config and the language monitor, plus `extra`
    dataclasses), in upstream's HfArgumentParser dialect: one definition per flag for every launcher."""
    from transformers import HfArgumentParser

    from .monitor import LanguageMonitorConfig
    from .regularizers import REGISTRY, config_classes
    parser = HfArgumentParser(config_classes() + (LanguageMonitorConfig,) + tuple(extra), allow_abbrev=False,
                              prog=prog, description=description)
    for action in parser._actions:  # the registry's names, so a method registered from outside is listed too
        if action.dest == "regularizer":
            action.help = f"{action.help} Methods: {', '.join(REGISTRY)}."
    return parser


def option_names() -> list[str]:
    from .monitor import LanguageMonitorConfig
    from .regularizers import config_classes
    return [f.name for c in config_classes() + (LanguageMonitorConfig,) for f in dataclasses.fields(c)]


def parse_options(parser, argv: list[str]):
    """(configs by class, monitor config, enabled method names, monitor items, the rest of argv), validated:
    ConfigError on a bad option. `parser` from options_parser without extras."""
    from .regularizers import validate
    *cfgs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    monitor = cfgs.pop()
    configs = {type(c): c for c in cfgs}
    given = given_flags(argv, option_names())
    return configs, monitor, validate(configs, given), monitor.validate(given), rest


def given_flags(argv: list[str], names) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")} & set(names)
