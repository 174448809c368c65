"""`tierkv cache`: list and clear what tierkv keeps under its cache directory (tierkv.paths.cache_dir)."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from tierkv.config import format_size
from tierkv.errors import ConfigError, StorageError
from tierkv.paths import cache_dir

# top-level entries of the cache directory and what they hold; anything else is listed as "other"
KINDS = {
    "gguf": "GGUF files converted to safetensors (one folder per model file content)",
    "runs": "disk-tier run directories (removed when a run closes; left by killed runs)",
    "chat_history": "the chat REPL's line history",
    "bench": "benchmark scratch files",
    "probes": "measured bandwidth probe results",
}


@dataclass(frozen=True)
class Entry:
    """One removable thing: a top-level file, or a folder inside a top-level folder (a run, a conversion)."""

    kind: str
    path: Path
    bytes: int
    in_use_by: int | None = None  # pid of the live process that owns it (runs only)


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir() or f.is_symlink())


def _run_owner(run: Path) -> int | None:
    """The pid in a run directory's name (<date>-<time>-<pid>-<random>, see tierkv/kv/storage/disk.py) when that
    process is alive; None otherwise."""
    parts = run.name.split("-")
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    pid = int(parts[2])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by someone else
    return pid


def entries(root: Path) -> list[Entry]:
    """Everything under root, one entry per run / conversion / file, sorted by kind then name."""
    out = []
    if not root.is_dir():
        return out
    for top in sorted(root.iterdir()):
        kind = top.name if top.name in KINDS else "other"
        children = sorted(top.iterdir()) if top.is_dir() and not top.is_symlink() else [top]
        for child in children:
            owner = _run_owner(child) if kind == "runs" else None
            out.append(Entry(kind, child, _size(child), owner))
    return out


@click.group("cache", invoke_without_command=True)
@click.pass_context
def command(ctx: click.Context) -> None:
    """List (the default) or clear what tierkv keeps on disk: GGUF conversions, run dirs, history, probes."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(list_command)


@command.command("list")
def list_command() -> None:
    """List each kind of cached data with its size, then its entries."""
    root = cache_dir()
    found = entries(root)
    click.echo(f"cache directory {root} (TIERKV_CACHE_DIR moves it): {format_size(sum(e.bytes for e in found))}")
    for kind in sorted({e.kind for e in found}):
        mine = [e for e in found if e.kind == kind]
        click.echo(f"{kind:13s} {len(mine):4d} entries {format_size(sum(e.bytes for e in mine)):>11s}  "
                   f"{KINDS.get(kind, 'not written by this version of tierkv')}")
        for e in mine:
            live = f"  (in use by pid {e.in_use_by})" if e.in_use_by else ""
            click.echo(f"  {e.path.relative_to(root)}  {format_size(e.bytes)}{live}")


@command.command("clear")
@click.argument("kinds", nargs=-1, metavar="[KIND]...")
@click.option("-y", "--yes", is_flag=True, help="Do not ask before removing.")
def clear_command(kinds: tuple[str, ...], yes: bool) -> None:
    """Remove cached data: every KIND (gguf, runs, chat_history, bench, probes, other), or all of it. Run
    directories of live processes are kept."""
    known = (*KINDS, "other")
    unknown = [k for k in kinds if k not in known]
    if unknown:
        raise ConfigError(f"unknown cache kind {', '.join(unknown)}; choose from {', '.join(known)}")
    root = cache_dir()
    chosen = [e for e in entries(root) if not kinds or e.kind in kinds]
    live = [e for e in chosen if e.in_use_by]
    doomed = [e for e in chosen if not e.in_use_by]
    if not doomed:
        click.echo(f"nothing to remove in {root}" + (f" ({len(live)} run(s) in use kept)" if live else ""))
        return
    total = format_size(sum(e.bytes for e in doomed))
    if not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"clearing {len(doomed)} entries ({total}) needs confirmation; pass --yes")
        click.confirm(f"remove {len(doomed)} entries ({total}) from {root}?", abort=True)
    for e in doomed:
        _remove(e.path)
    click.echo(f"removed {len(doomed)} entries ({total}) from {root}"
               + (f"; kept {len(live)} run(s) in use" if live else ""))


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass  # removed meanwhile (a run that closed)
    except OSError as e:
        raise StorageError(f"cannot remove {path} ({e.strerror}); check its permissions") from None
