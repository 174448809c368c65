"""`tierkv chat`: an interactive multi-turn REPL with streamed replies, a context file and resumable sessions.

Commands: /save [DIR], /load DIR, /reset, /stats, /help, /exit. Lines come from readline on a terminal (with a
history file, ~/.cache/tierkv/chat_history, off with --no-history or TIERKV_NO_HISTORY=1) or from piped stdin,
one message per line.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from tierkv.cli.common import MODEL_HELP, model_options, plan_note, sampling_from_flags, sampling_options, tier_settings
from tierkv.config import format_size
from tierkv.errors import ConfigError, TierKVError
from tierkv.inputs import read_text_file
from tierkv.paths import cache_dir

HELP = "/save [DIR]  /load DIR  /reset  /stats  /help  /exit"
DEFAULT_MAX_NEW_TOKENS = 512
NO_HISTORY_ENV = "TIERKV_NO_HISTORY"


@click.command("chat", help="Chat with MODEL turn after turn, reusing the KV cache. MODEL: " + MODEL_HELP)
@click.argument("model_arg", metavar="[MODEL]", required=False)
@click.option("-m", "--model", default=None, help="The model (instead of the MODEL argument).")
@click.option("--context", "context_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A UTF-8 text file placed once at the start of the conversation (a book, a source tree).")
@click.option("--session", "session_dir", type=click.Path(file_okay=False), default=None,
              help="Session directory: resumed when it holds a session, the default target of /save.")
@click.option("--system", default=None, help="System prompt.")
@sampling_options(DEFAULT_MAX_NEW_TOKENS)
@click.option("--overflow", type=click.Choice(["drop-oldest", "refuse"]), default="drop-oldest", show_default=True,
              help="When the history fills the context: drop the oldest turns (the --context prefix stays), or "
                   "refuse the message (then /reset).")
@click.option("--no-history", is_flag=True, help=f"Do not read or write the line history file (or set "
                                                 f"{NO_HISTORY_ENV}=1).")
@click.option("--stats", "show_stats", is_flag=True,
              help="After each reply print prefill, decode, KV placement and peak memory statistics (JSON).")
@model_options
def command(model_arg, model, context_file, session_dir, system, overflow, no_history, show_stats, device, dtype,
            no_graph, ctx_size, **flags) -> None:
    if model_arg is not None and model is not None:
        raise ConfigError(f"the model is given twice ({model_arg!r} and -m {model!r}); give one")
    sampling, _ = sampling_from_flags(flags, DEFAULT_MAX_NEW_TOKENS)
    if context_file:
        read_text_file(context_file, "context file")  # refuse a non-UTF-8 file before the model loads
    tier = tier_settings(flags)
    import tierkv

    llm = tierkv.load(model or model_arg, device=device, dtype=dtype, graph=not no_graph, progress=True,
                      ctx_size=ctx_size, **tier)
    if plan_note(llm):
        click.echo(plan_note(llm), err=True)
    gen = {"sampling": sampling, "overflow": overflow}
    try:
        if session_dir and (Path(session_dir) / "session.json").exists():
            if context_file or system:
                click.echo("note: resuming the session; --context and --system apply only to new sessions", err=True)
            chat = tierkv.Chat.load(session_dir, llm, **gen)
            _say(f"resumed {session_dir}: {chat.stats['turns']} turns, {chat.stats['tokens_in_context']} tokens")
        else:
            chat = llm.chat(system=system, context=Path(context_file) if context_file else None, **gen)
            if context_file:
                _say(f"context: {chat.prefix_len} tokens from {context_file}")
        history = not (no_history or os.environ.get(NO_HISTORY_ENV, "") not in ("", "0"))
        _repl(llm, chat, Repl(session_dir, gen, history, show_stats))
    finally:
        llm.unload()  # caches, and the weight streamer's thread and spill file


def _say(text: str) -> None:
    click.echo(text, err=True)


@dataclass
class Repl:
    """The REPL's settings and what it tracks between lines."""

    session_dir: str | None
    gen: dict
    history: bool
    show_stats: bool
    unsaved: int = 0  # turns since the start, the last /save or /load
    warned_exit: bool = False


def _lines(history: bool):
    """Yield input lines: readline on a terminal (with the history file unless history is off), plain stdin
    otherwise."""
    if not sys.stdin.isatty():
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    import readline  # noqa: F401 - enables line editing (and history) for input()

    hist = cache_dir("chat_history")
    if history:
        try:
            readline.read_history_file(hist)
        except OSError:
            pass
    try:
        while True:
            try:
                yield input("> ")
            except EOFError:
                click.echo("")
                return
    finally:
        if history:
            try:
                hist.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(hist)
            except OSError:
                pass


def _repl(llm, chat, state: Repl) -> None:
    """Read lines until /exit or end of input; every other line is a user message answered in a stream."""
    for line in _lines(state.history):
        text = line.strip()
        if not text:
            continue
        try:
            if text.partition(" ")[0] in ("/exit", "/quit"):
                if _may_exit(state):
                    break
                continue
            chat = _line(llm, chat, state, text)
        except TierKVError as exc:
            _say(f"error: {exc}")
        except KeyboardInterrupt:
            click.echo("")
            _say("interrupted")
    else:
        if state.unsaved:
            _say(f"{state.unsaved} unsaved turn(s) discarded")
    chat.close()


def _may_exit(state: Repl) -> bool:
    """/exit quits, except the first time with unsaved turns: that one says so."""
    if not state.unsaved or state.warned_exit:
        return True
    state.warned_exit = True
    _say(f"{state.unsaved} unsaved turn(s): /save [DIR] keeps them, /exit again quits without saving")
    return False


def _line(llm, chat, state: Repl, text: str):
    """Run one command or message; returns the chat (a new one after /load)."""
    import tierkv

    cmd, _, arg = text.partition(" ")
    if cmd == "/help":
        _say(HELP)
    elif cmd == "/save":
        target = arg.strip() or state.session_dir
        if not target:
            raise ConfigError("/save needs a directory: /save DIR, or start with --session DIR")
        info = chat.save(target)
        state.unsaved, state.warned_exit = 0, False
        _say(f"saved {target} ({format_size(info['bytes'])} in {info['seconds']:.2f} s)")
    elif cmd == "/load":
        if not arg.strip():
            raise ConfigError("/load needs a directory: /load DIR")
        new = tierkv.Chat.load(arg.strip(), llm, **state.gen)
        chat.close()
        chat, state.unsaved = new, 0
        _say(f"loaded {arg.strip()}: {chat.stats['turns']} turns, {chat.stats['tokens_in_context']} tokens")
    elif cmd == "/reset":
        chat.reset()
        state.unsaved = 0
        _say(f"reset: {chat.stats['tokens_in_context']} context tokens kept")
    elif cmd == "/stats":
        _say(json.dumps(chat.stats, default=str))
    elif cmd.startswith("/"):
        _say(f"unknown command {cmd}; {HELP}")
    else:
        _answer(llm, chat, state, text)
    return chat


def _answer(llm, chat, state: Repl, text: str) -> None:
    from tierkv.llm import peak_memory

    for piece in chat.stream(text):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo("")
    state.unsaved += 1
    t = chat.stats["last_turn"]
    _say(f"[{t['prefilled']} tok prefilled, {t['reused']} reused, {t['new_tokens']} new, "
         f"{t['decode_tok_s']:.1f} tok/s]")
    if state.show_stats:
        _say(json.dumps({**chat.stats, "peak_memory": peak_memory(llm.device)}, default=str))
