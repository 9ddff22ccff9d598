"""Shared CLI plumbing: a :class:`BsymError` becomes exit code 1 with a message; SIGTERM, 143."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from bsym.errors import BsymError

T = TypeVar("T")
# Soft wrap: long paths in messages stay whole, for copying, instead of being cut at 80 columns.
stderr = Console(stderr=True, soft_wrap=True)
stdout = Console(soft_wrap=True)
TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM, so that every ``finally`` (temporary files) runs."""


@contextmanager
def user_errors() -> Iterator[None]:
    """Report a BsymError as ``error: <message>`` and exit 1 instead of a traceback."""
    try:
        yield
    except BsymError as error:
        # escaped: messages name extras like bsym[gpu], which rich would read as markup
        stderr.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False)
        raise typer.Exit(code=1) from error


def run_reporting_errors(function: Callable[[], T]) -> T:
    """Call ``function`` inside :func:`user_errors`."""
    with user_errors():
        return function()


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM (what batch systems send) into :class:`Terminated`, exit status 143.

    Later SIGTERMs are ignored so that they cannot interrupt the clean-up of the first.
    """

    def terminate(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(TERMINATED_EXIT_CODE)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except Terminated:
        stderr.print(
            "[bold red]terminated[/] by SIGTERM: partial outputs were removed, "
            "complete outputs are kept",
            highlight=False,
        )
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
