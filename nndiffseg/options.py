"""Command-line options declared once, where they are used (a head's prediction options, a trainer's training
options); the CLIs' arguments are built from these declarations and checked against them (nndiffseg.registry)."""
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence


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

