"""`tierkv run`: generate a reply to one prompt, streamed to stdout, with a stats line on stderr."""

from __future__ import annotations

import json
import sys

import click

from tierkv.cli.common import MODEL_HELP, model_options, plan_note, sampling_from_flags, sampling_options, tier_settings
from tierkv.config import format_size
from tierkv.errors import ConfigError, ContextTooLongError
from tierkv.inputs import decode_utf8, read_text_file, require_text

DEFAULT_MAX_NEW_TOKENS = 256


def split_model_and_prompt(args: tuple[str, ...], model: str | None, prompt_elsewhere: bool) -> tuple[str | None, str | None]:
    """(model, prompt) from the positional arguments. With -m, a positional is the prompt. Two positionals are
    MODEL PROMPT. One positional is the model only when it names a model on this machine (or the prompt came
    from -p, --prompt-file); otherwise it is the prompt, so `tierkv run "What is 1/2 + 1/3?"` just works."""
    from tierkv.models.names import local_model

    if len(args) > 2:
        raise ConfigError(f"{len(args)} positional arguments given; quote the prompt: tierkv run [MODEL] \"PROMPT\"")
    if model is not None:
        if len(args) == 2 or (args and prompt_elsewhere):
            raise ConfigError("-m names the model, so give at most one positional argument, the prompt")
        return model, (args[0] if args else None)
    if len(args) == 2:
        if prompt_elsewhere:
            raise ConfigError("the prompt is given twice; give PROMPT, -p TEXT or --prompt-file F, one of them")
        return args[0], args[1]
    if not args:
        return None, None
    if prompt_elsewhere or local_model(args[0]) is not None:
        return args[0], None
    return None, args[0]


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    """The prompt text from the argument, a UTF-8 file or piped stdin; refused when empty."""
    if prompt is not None and prompt_file is not None:
        raise ConfigError("give the prompt as an argument or with --prompt-file, not both")
    if prompt_file is not None:
        return require_text(read_text_file(prompt_file, "prompt file"), f"prompt file {prompt_file!r}")
    if prompt is None:
        if sys.stdin.isatty():
            raise ConfigError("no prompt given; pass PROMPT, -p TEXT, --prompt-file F, or pipe text on stdin")
        return require_text(decode_utf8(sys.stdin.buffer.read(), "stdin"), "the prompt on stdin")
    return require_text(prompt, "the prompt")


@click.command("run", help="Answer PROMPT with MODEL, streaming the reply. MODEL: " + MODEL_HELP)
@click.argument("args", nargs=-1, metavar="[MODEL] [PROMPT]")
@click.option("-m", "--model", default=None, help="The model (then a positional argument is the prompt).")
@click.option("-p", "--prompt", "prompt_opt", default=None, help="The prompt text.")
@click.option("-f", "--prompt-file", default=None, help="Read the prompt from this UTF-8 file.")
@click.option("--system", default=None, help="System prompt (sent through the model's chat template).")
@sampling_options(DEFAULT_MAX_NEW_TOKENS)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the model's chat template.")
@click.option("--stats", "show_stats", is_flag=True,
              help="Print prefill, decode and memory statistics (JSON, with the KV tiers' when tiered) on stderr.")
@model_options
def command(args, model, prompt_opt, prompt_file, system, raw, show_stats, device, dtype, no_graph, ctx_size,
            **flags) -> None:
    sampling, given_n = sampling_from_flags(flags, DEFAULT_MAX_NEW_TOKENS)
    model, prompt = split_model_and_prompt(args, model, prompt_opt is not None or prompt_file is not None)
    if prompt_opt is not None:
        prompt = prompt_opt
    text = read_prompt(prompt, prompt_file)
    if system is not None and raw:
        raise ConfigError("--system goes through the chat template, which --raw turns off; drop one of them")
    tier = tier_settings(flags)
    import tierkv

    llm = tierkv.load(model, device=device, dtype=dtype, graph=not no_graph, progress=True, ctx_size=ctx_size, **tier)
    if plan_note(llm):
        click.echo(plan_note(llm), err=True)
    try:
        kwargs = _prompt_kwargs(llm, text, system, raw)
        if given_n:
            _check_room(len(llm.encode(**kwargs)), sampling.max_new_tokens, llm.context_size)
        for piece in llm.stream(sampling=sampling, progress=True, **kwargs):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo("")
    finally:
        llm.unload()  # caches, and the weight streamer's thread and spill file
    _report(llm, show_stats)


def _prompt_kwargs(llm, text: str, system: str | None, raw: bool) -> dict:
    """prompt= (raw, or a model without a chat template) or messages= for LLM.stream."""
    from tierkv.chat_template import template_mode

    if raw or template_mode(llm.tokenizer) == "plain":
        if system is not None:
            raise ConfigError(f"--system needs a chat template and {llm.source!r} has none; put it in the prompt")
        return {"prompt": text}
    messages = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": [*messages, {"role": "user", "content": text}]}


def _check_room(n_prompt: int, max_new: int, context: int) -> None:
    """An explicit -n that cannot fit after the prompt is refused up front (a default -n is cut instead)."""
    if n_prompt < context and n_prompt + max_new > context:
        raise ContextTooLongError(f"prompt has {n_prompt} tokens and -n {max_new} asks for {max_new} more, but the "
                                  f"context is {context} tokens; pass -n {context - n_prompt} or less, or shorten "
                                  f"the prompt")


def _report(llm, show_stats: bool) -> None:
    s = llm.stats
    if show_stats:
        click.echo(json.dumps({"device": llm.device.type, "context_size": llm.context_size, **s}, default=str),
                   err=True)
    if s["stop_reason"] == "context_full":
        click.echo(f"note: the reply stopped at the end of the context ({llm.context_size} tokens); shorten the "
                   f"prompt for a longer reply", err=True)
    w = s.get("weights")
    if w:
        click.echo(weights_line(w), err=True)
    click.echo(f"prompt {s['prompt_tokens']} tok | prefill {s['prefill_tok_s']:.1f} tok/s | "
               f"decode {s['decode_tok_s']:.1f} tok/s ({s['decode_ms_per_token']:.2f} ms/tok, {s['new_tokens']} tok; "
               f"first step {1e3 * s['first_step_s']:.0f} ms) | "
               f"peak memory {format_size(s['peak_memory'])} ({llm.device.type})", err=True)


def weights_line(w: dict) -> str:
    """One line on the layer weights: where the layers are and, when some stream, what that cost per token."""
    counts = ", ".join(f"{n} {where}" for where, n in w["counts"].items() if n)
    line = f"weights: layers {counts} ({format_size(w['device_bytes'])} on the device)"
    if w.get("streamed_bytes_per_token") is not None:
        gbps = w.get("achieved_gbps")
        line += (f" | streamed {format_size(w['streamed_bytes_per_token'])}/tok"
                 + (f" at {gbps:.1f} GB/s" if gbps else "")
                 + (f", waited {w['wait_ms_per_token']:.2f} ms/tok" if "wait_ms_per_token" in w else "")
                 + f" ({w['decode']} decode"
                 + ("" if w["streamer_mode"] in ("pinned", "cpu") else f", {w['streamer_mode']}: pinning failed")
                 + ")")
    return line
