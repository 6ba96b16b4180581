"""Command-line options declared once, where they are used (a head's prediction options, a trainer's training
options); the CLIs build their arguments from these declarations and the registry checks against them."""
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence


@dataclass(frozen=True)
class Option:
    """``--NAME`` (or ``flag``) on the command line; ``const`` makes it a switch that stores that value."""
    name: str
    help: str
    type: Optional[Callable] = None
    choices: Optional[Sequence] = None
    flag: Optional[str] = None
    const: Any = None

    @property
    def cli(self) -> str:
        return self.flag or f"--{self.name}"


def add_options(group: Any, options: Iterable[Option], default: Optional[str] = None) -> None:
    """Add ``options`` to an argparse parser or group, each help ending with ``default`` where given (the
    namespace holds None for an option not given)."""
    for option in options:
        kind = dict(action="store_const", const=option.const) if option.const is not None \
            else dict(type=option.type, choices=option.choices)
        note = f" (default: {default})" if default else ""
        group.add_argument(option.cli, dest=option.name, default=None, help=option.help + note, **kind)
