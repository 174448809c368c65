"""The `tierkv` command: a click group with one module per command; errors print as one line."""

from __future__ import annotations

import signal
import sys

import click

from tierkv.errors import TierKVError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tierkv")
def cli() -> None:
    """tierkv: long-context LLM inference with the KV cache spread over GPU, CPU memory and NVMe."""


def _register() -> None:
    # Imported here so `tierkv --help` stays cheap and each command lives in its own module.
    from tierkv.cli import bench, cache, chat, info, plan, run

    for module in (run, chat, info, bench, plan, cache):
        cli.add_command(module.command)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread: it unwinds like Ctrl-C, so `finally` blocks close caches and remove
    their disk-tier files, but the chat REPL does not catch it as an interrupted reply."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group; a TierKVError becomes one line on stderr and exit code 2."""
    _register()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="tierkv", standalone_mode=False)
    except TierKVError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Terminated:
        click.echo("terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
