"""`tierkv chat`: an interactive multi-turn REPL with streamed replies, a context file and resumable sessions.

Commands: /save [DIR], /load DIR, /reset, /stats, /help, /exit. Lines come from readline on a terminal (with a
history file) or from piped stdin, one message per line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tierkv.cli.common import MODEL_HELP, model_options, tier_settings
from tierkv.config import format_size
from tierkv.errors import ConfigError, TierKVError
from tierkv.paths import cache_dir

HELP = "/save [DIR]  /load DIR  /reset  /stats  /help  /exit"


@click.command("chat", help="Chat with MODEL turn after turn, reusing the KV cache. MODEL: " + MODEL_HELP)
@click.argument("model", required=False)
@click.option("--context", "context_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A text file placed once at the start of the conversation (a book, a source tree).")
@click.option("--session", "session_dir", type=click.Path(file_okay=False), default=None,
              help="Session directory: resumed when it holds a session, the default target of /save.")
@click.option("--system", default=None, help="System prompt.")
@click.option("--max-new-tokens", type=int, default=512, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@model_options
def command(model, context_file, session_dir, system, max_new_tokens, temperature, top_p, seed, device, dtype,
            no_graph, **flags) -> None:
    import tierkv

    llm = tierkv.load(model, device=device, dtype=dtype, graph=not no_graph, progress=True, **tier_settings(flags))
    gen = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
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
        _repl(llm, chat, session_dir, gen)
    finally:
        llm.close()


def _say(text: str) -> None:
    click.echo(text, err=True)


def _lines():
    """Yield input lines: readline with a history file on a terminal, plain stdin otherwise."""
    if not sys.stdin.isatty():
        for line in sys.stdin:
            yield line.rstrip("\n")
        return
    import readline  # noqa: F401 - enables line editing and history for input()

    hist = cache_dir("chat_history")
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
        try:
            hist.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(hist)
        except OSError:
            pass


def _repl(llm, chat, session_dir: str | None, gen: dict) -> None:
    """Read lines until /exit or end of input; every other line is a user message answered in a stream."""
    import tierkv

    for line in _lines():
        text = line.strip()
        if not text:
            continue
        cmd, _, arg = text.partition(" ")
        try:
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/help":
                _say(HELP)
            elif cmd == "/save":
                target = arg.strip() or session_dir
                if not target:
                    raise ConfigError("/save needs a directory: /save DIR, or start with --session DIR")
                info = chat.save(target)
                _say(f"saved {target} ({format_size(info['bytes'])} in {info['seconds']:.2f} s)")
            elif cmd == "/load":
                if not arg.strip():
                    raise ConfigError("/load needs a directory: /load DIR")
                new = tierkv.Chat.load(arg.strip(), llm, **gen)
                chat.close()
                chat = new
                _say(f"loaded {arg.strip()}: {chat.stats['turns']} turns, {chat.stats['tokens_in_context']} tokens")
            elif cmd == "/reset":
                chat.reset()
                _say(f"reset: {chat.stats['tokens_in_context']} context tokens kept")
            elif cmd == "/stats":
                _say(json.dumps(chat.stats, default=str))
            elif cmd.startswith("/"):
                _say(f"unknown command {cmd}; {HELP}")
            else:
                for piece in chat.stream(text):
                    click.echo(piece, nl=False)
                    sys.stdout.flush()
                click.echo("")
                t = chat.stats["last_turn"]
                _say(f"[{t['prefilled']} tok prefilled, {t['reused']} reused, {t['new_tokens']} new, "
                     f"{t['decode_tok_s']:.1f} tok/s]")
        except TierKVError as exc:
            _say(f"error: {exc}")
        except KeyboardInterrupt:
            click.echo("")
            _say("interrupted")
    chat.close()
