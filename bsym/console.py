"""Shared CLI plumbing: turn a :class:`BsymError` into a message on stderr and exit code 1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import typer
from rich.console import Console

from bsym.errors import BsymError

T = TypeVar("T")
stderr = Console(stderr=True)
stdout = Console()


@contextmanager
def user_errors() -> Iterator[None]:
    """Report a BsymError as ``error: <message>`` and exit 1 instead of a traceback."""
    try:
        yield
    except BsymError as error:
        stderr.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(code=1) from error


def run_reporting_errors(function: Callable[[], T]) -> T:
    """Call ``function`` inside :func:`user_errors`."""
    with user_errors():
        return function()
