"""`tierkv run`: generate a reply to one prompt, streamed to stdout, with a stats line on stderr."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tierkv.cli.common import MODEL_HELP, model_options, tier_settings
from tierkv.config import format_size
from tierkv.errors import ConfigError


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give the prompt as an argument or with --prompt-file, not both")
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.exists():
            raise ConfigError(f"prompt file {prompt_file!r} does not exist; give a readable text file")
        if path.is_dir():
            raise ConfigError(f"prompt file {prompt_file!r} is a directory; give a readable text file")
        try:  # a pipe such as bash's <(...) is fine too
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise ConfigError(f"prompt file {prompt_file!r} cannot be read ({e.strerror}); give a readable text file") from None
    if prompt is None:
        if sys.stdin.isatty():
            raise ConfigError("no prompt given; pass PROMPT, --prompt-file F, or pipe text on stdin")
        return sys.stdin.read()
    return prompt


@click.command("run", help="Answer PROMPT with MODEL, streaming the reply. MODEL: " + MODEL_HELP)
@click.argument("model", required=False)
@click.argument("prompt", required=False)
@click.option("--prompt-file", default=None, help="Read the prompt from this file.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@click.option("--stats", "show_stats", is_flag=True, help="Print KV tier statistics (JSON) on stderr at the end.")
@model_options
def command(model, prompt, prompt_file, max_new_tokens, temperature, top_p, seed, raw, show_stats, device, dtype,
            no_graph, **flags) -> None:
    import tierkv

    if prompt is None and model is not None and not _looks_like_model(model):
        model, prompt = None, model  # `tierkv run "question"` uses the default model
    text = _read_prompt(prompt, prompt_file)
    llm = tierkv.load(model, device=device, dtype=dtype, graph=not no_graph, progress=True, **tier_settings(flags))
    use_chat = not raw and getattr(llm.tokenizer, "chat_template", None)
    kwargs = {"messages": [{"role": "user", "content": text}]} if use_chat else {"prompt": text}
    try:
        for piece in llm.stream(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                progress=True, **kwargs):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo("")
    finally:
        llm.close()
    s = llm.stats
    if show_stats and "kv" in s:
        click.echo(json.dumps(s["kv"], default=str), err=True)
    click.echo(f"prompt {s['prompt_tokens']} tok | prefill {s['prefill_tok_s']:.1f} tok/s | "
               f"decode {s['decode_tok_s']:.1f} tok/s ({s['decode_ms_per_token']:.2f} ms/tok, {s['new_tokens']} tok) | "
               f"peak memory {format_size(s['peak_memory'])} ({llm.device.type})", err=True)


def _looks_like_model(arg: str) -> bool:
    from tierkv.models.shapes import SHAPES

    return arg in SHAPES or Path(arg).expanduser().exists() or arg.endswith(".gguf") or "/" in arg
