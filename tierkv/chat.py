"""Chat: a multi-turn session over one KV cache that prefills only the tokens a turn adds, saved and resumed.

The model's chat template renders the whole conversation every turn; the cache is rolled back to the longest
common prefix of what it holds and the new rendering, so it always holds exactly the template's tokens.
"""

from __future__ import annotations

import os
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

import tierkv
from tierkv.config import TierConfig, format_size
from tierkv.engine import GenStats, eager_step, generate_ids, prefill
from tierkv.errors import BudgetError, ConfigError, ContextTooLongError, TierKVError
from tierkv.inputs import require_text
from tierkv.kv.caches.base import KVCache, copy_state
from tierkv.session import SessionError, check_compatible, model_identity, read_manifest, read_tokens, restore_kv, \
    save_session
from tierkv.chat_template import render
from tierkv.oom import guard_memory
from tierkv.sample import Sampler
from tierkv.sample_config import SamplingConfig, sampling_config
from tierkv.stop_text import StopText

CONTEXT_JOIN = "\n\n"  # between system= and context= in the system message
_SESSIONS: "weakref.WeakKeyDictionary[object, weakref.WeakSet]" = weakref.WeakKeyDictionary()  # LLM -> open chats


class ChatClosedError(TierKVError):
    """A call on a chat session after close()."""


@dataclass
class TurnStats:
    """What the last turn cost: tokens reused from the cache, rolled back, prefilled and generated."""

    reused: int = 0
    rolled_back: int = 0
    prefilled: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_tok_s: float = 0.0


class Chat:
    """A conversation with one LLM whose KV cache persists between turns. Not thread-safe.

    Sessions on one LLM share its tier budgets: each takes `budget_share` of kv_gpu_budget/cpu_budget (default:
    all that other open sessions have not taken) and returns it on close(). Each has its own cache and files.
    """

    @guard_memory(lambda chat: chat.llm.tier, lambda chat: chat.llm.device)
    def __init__(self, llm, system: str | None = None, context: str | os.PathLike | None = None, *,
                 sampling: SamplingConfig | None = None, overflow: str = "drop-oldest", progress: bool = True,
                 budget_share: float | None = None, _restore: dict | None = None, **options) -> None:
        """Open a session; with context=, prefill the system message holding it now (blocks, progress bar).

        options: SamplingConfig fields (max_new_tokens, temperature, top_p, top_k, min_p, repeat_penalty, stop,
        seed) over `sampling`. overflow: what a turn does when the history no longer fits (see fit_history).
        """
        self.llm, self.progress = llm, progress
        self.gen = sampling_config(sampling, **options)
        self.overflow = check_overflow_policy(overflow)
        max_new_tokens = self.gen.max_new_tokens
        self._tier, self._grant = _session_tier(llm, budget_share)
        self.messages: list[dict] = []
        self.ids: list[int] = []  # exactly the tokens in the cache
        self.last_turn, self.restored, self.last_save = TurnStats(), None, None
        self._graph, self._closed = None, False
        if _restore is not None:
            self.messages, self.prefix_len, n = _restore["messages"], _restore["prefix_len"], _restore["num_tokens"]
            self.cache = self._new_cache(n + max_new_tokens + 64)
            _SESSIONS.setdefault(llm, weakref.WeakSet()).add(self)
            return
        text = _read_context(context)
        if system is not None or text is not None:
            content = CONTEXT_JOIN.join(s for s in (system, text) if s is not None)
            self.messages.append({"role": "system", "content": content})
        prefix = self._prefix_ids()
        llm.check_length(len(prefix) + 1)
        self.cache = self._new_cache(len(prefix) + max_new_tokens + 512)
        _SESSIONS.setdefault(llm, weakref.WeakSet()).add(self)
        self.prefix_len = len(prefix)
        if prefix:
            t0 = time.perf_counter()
            self._prefill(prefix, progress=progress)
            self.ids = list(prefix)
            self.last_turn = TurnStats(prefilled=len(prefix), prefill_s=time.perf_counter() - t0)

    # ---- construction ------------------------------------------------------------------------------
    def _prefix_ids(self) -> list[int]:
        """Tokens of the system message that every later rendering starts with (checked against a probe turn)."""
        if not self.messages:
            return []
        own = render(self.llm, self.messages, add_generation_prompt=False)
        probe = render(self.llm, [*self.messages, {"role": "user", "content": "?"}], add_generation_prompt=True)
        return own[:common_prefix(own, probe)]

    def _new_cache(self, capacity: int) -> KVCache:
        """A cache for this session, chosen by tierkv/kv/factory.py for use "chat" with this session's share of the
        tier budgets; registered with the LLM (closed by llm.close())."""
        capacity = min(capacity, self.llm.context_size + 1)
        return self.llm.new_cache(capacity, use="chat", tier=self._tier)

    @classmethod
    def load(cls, path: str | os.PathLike, llm, **options) -> "Chat":
        """Resume a saved session on llm without recomputing its prefill. Blocks on reads.

        Refuses (SessionMismatchError) another model, dtype or attention mode, and (SessionDamagedError) a file
        that fails its checksum, naming it. options are Chat's (max_new_tokens, temperature, budget_share, ...).
        """
        t0 = time.perf_counter()
        body = read_manifest(path)
        check_compatible(Path(path).absolute(), body, llm)
        ids = read_tokens(path, body)
        chat = cls(llm, _restore=body, **{"progress": False, **options})
        try:
            nbytes = restore_kv(path, body, chat.cache)
        except BaseException:
            chat.close()
            raise
        chat.ids = ids
        chat.restored = {"path": str(Path(path).absolute()), "tokens": len(ids), "bytes": nbytes,
                         "seconds": time.perf_counter() - t0}
        return chat

    # ---- turns ---------------------------------------------------------------------------------------
    def send(self, text: str, **gen) -> str:
        """Add a user turn and return the whole reply (stop token and stop strings removed). Blocks; mutates."""
        return "".join(self.stream(text, **gen))

    @guard_memory(lambda chat: chat.llm.tier, lambda chat: chat.llm.device)
    def stream(self, text: str, **gen) -> Iterator[str]:
        """Add a user turn and yield the reply as text pieces while it is generated.

        gen overrides SamplingConfig fields for this turn. Closing the iterator early keeps the part of the reply
        generated so far (in the history and the cache). A history that no longer fits is handled by the
        session's overflow policy (fit_history).
        """
        self._check_open()
        opts = self.gen.updated(**gen)
        require_text(text, "the message")
        msgs, ids = fit_history(self.llm, [*self.messages, {"role": "user", "content": text}], opts.max_new_tokens,
                                self.overflow)
        max_new = min(opts.max_new_tokens, self.llm.context_size - len(ids))
        keep = min(common_prefix(self.ids, ids), len(ids) - 1)  # the last prompt token is fed to get logits
        if keep < self.cache.seq_len:
            keep = self._roll_back(keep)
        turn = self.last_turn = TurnStats(reused=keep, rolled_back=len(self.ids) - keep, prefilled=len(ids) - keep)
        self.ids = self.ids[:keep]
        self._ensure_capacity(len(ids) + max_new + 1)
        got: list[int] = []
        done = False
        try:
            t0 = time.perf_counter()
            logits = self._prefill(ids[keep:], progress=self.progress)
            turn.prefill_s = time.perf_counter() - t0
            stats = GenStats()
            toks = _record(generate_ids(self._step(), logits, len(ids), max_new, self.llm.stop_ids, stats,
                                        sampler=Sampler(opts, self.llm.device, ids)), got)
            yield from self.llm.detokenize(toks, StopText(opts.stop))
            turn.decode_tok_s = stats.decode_tok_s
            done = True
        finally:
            self._commit(msgs, ids, got, clean=done)
            turn.new_tokens = len(got)

    def _prefill(self, ids: Sequence[int], progress: bool) -> torch.Tensor:
        x = torch.tensor(list(ids), dtype=torch.long, device=self.llm.device)
        logits = prefill(self.llm.model, x, self.cache, self.llm.tier.prefill_chunk, progress=progress,
                         device_limit=self.llm.device_limit)
        logits.sum().item()  # wait for the prefill so its time is billed to it
        return logits

    def _commit(self, msgs: list[dict], ids: list[int], got: list[int], clean: bool) -> None:
        """Record the turn: the cache holds ids + got[:-1] (the last token was sampled but never fed)."""
        n = self.cache.seq_len
        if not clean:
            n = self._roll_back(n)  # an interrupted forward may have appended to some layers
        self.ids = (ids + got)[:n]
        if got:
            reply = [t for t in got if t not in self.llm.stop_ids]
            text = self.llm.tokenizer.decode(reply, skip_special_tokens=True)
            self.messages = [*msgs, {"role": "assistant", "content": text}]

    def _roll_back(self, n: int) -> int:
        """Truncate the cache to n tokens, or to none where it cannot keep what position n reads (a sliding-window
        ring holds only its newest positions: the turn then prefills the conversation again). Returns the tokens
        kept. Mutates."""
        if not self.cache.can_truncate(n):
            n = 0
        self.cache.truncate(n)
        return n

    def _step(self):
        if self.cache.path["captured"] and self.llm.weights_capturable:
            from tierkv.graph import GraphStep

            if self._graph is None or self._graph.cache is not self.cache:  # once per cache (capacity class)
                self._graph = GraphStep(self.llm.model, self.cache)
            return self._graph
        return eager_step(self.llm.model, self.cache)

    @property
    def graph_step(self):
        """The captured decode step of this session's cache (tierkv/graph.GraphStep), None before the first
        captured turn or when decode runs eagerly."""
        return self._graph

    def _ensure_capacity(self, need: int) -> None:
        """A fixed-capacity cache (static, sparse) too small for this turn moves into one of the next capacity
        class (kv/factory.capacity_class) with its whole state (copy_state); the decode graph is captured anew
        for it, once. Blocks."""
        old = self.cache
        if not old.fixed_capacity or need <= old.capacity:
            return
        new = self._new_cache(need)
        try:
            copy_state(old, new)
        except BaseException:
            self.llm.release_cache(new)
            raise
        self.llm.release_cache(old)
        self.cache, self._graph = new, None

    # ---- session ---------------------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """The messages so far (system message with the context first, then user/assistant turns); a copy."""
        return [dict(m) for m in self.messages]

    @property
    def stats(self) -> dict:
        """Tokens in the cache, what the last turn prefilled, and where the K/V lives. Does not mutate."""
        self._check_open()
        c = self.cache
        s = c.stats()
        out = {"tokens_in_context": c.seq_len, "prefix_tokens": self.prefix_len,
               "turns": sum(m["role"] == "user" for m in self.messages), "last_turn": asdict(self.last_turn),
               "cache": s["cache"], "path": s["path"], "tier_bytes": s["tier_bytes"],
               "budget_bytes": s["budget_bytes"], "restored": self.restored, "last_save": self.last_save}
        if "disk_backend" in s:
            out["disk_backend"] = s["disk_backend"]
        return out

    def reset(self) -> None:
        """Forget every turn but keep the system/context prefix (the cache is truncated to it; a sparse cache refits
        its shadows at the next turn, as a fresh session would). Mutates."""
        self._check_open()
        self._roll_back(min(self.prefix_len, self.cache.seq_len))
        self.ids = self.ids[:self.cache.seq_len]
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.last_turn = TurnStats()

    def save(self, path: str | os.PathLike) -> dict:
        """Write the session to directory path atomically (an earlier save there stays whole until the new one
        is complete). Blocks on writes; does not change the session. Returns {"bytes", "seconds", "swap"}."""
        self._check_open()
        c = self.cache
        body = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tierkv_version": tierkv.__version__,
                "model": model_identity(self.llm), "attention": self.llm.tier.attention,
                "tier": asdict(self.llm.tier), "cache_kind": c.kind, "messages": self.messages,
                "prefix_len": self.prefix_len, "placement": c.placement_bytes()}
        self.last_save = save_session(path, body, self.ids, c)
        return self.last_save

    def close(self) -> None:
        """Release the cache (its files and memory) and this session's budget share. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self.llm.release_cache(self.cache)

    def _check_open(self) -> None:
        if self._closed:
            raise ChatClosedError("this chat session is closed; open a new one with llm.chat() or Chat.load()")

    def __enter__(self) -> "Chat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- helpers -------------------------------------------------------------------------------------------
OVERFLOW_POLICIES = ("drop-oldest", "refuse")


def check_overflow_policy(policy: str) -> str:
    if policy not in OVERFLOW_POLICIES:
        raise ConfigError(f"overflow={policy!r} is unknown; choose from {', '.join(OVERFLOW_POLICIES)}")
    return policy


def fit_history(llm, msgs: list[dict], max_new_tokens: int, policy: str) -> tuple[list[dict], list[int]]:
    """msgs (ending with the new user message) and their rendered ids, made to fit the context with room for
    the reply (max_new_tokens, at most a quarter of the context). "drop-oldest" removes the oldest turns after
    the system message (which holds context=); "refuse" raises ContextTooLongError with a hint to reset."""
    room = min(max_new_tokens, llm.context_size // 4)
    head = 1 if msgs[0]["role"] == "system" else 0
    while True:
        ids = render(llm, msgs, add_generation_prompt=True)
        if len(ids) + room <= llm.context_size:
            return msgs, ids
        turns = len(msgs) - head - 1  # earlier messages that could go
        if policy == "refuse" and turns:
            raise ContextTooLongError(f"the conversation has {len(ids)} tokens and the reply needs {room} more, but "
                                      f"the context is {llm.context_size}; /reset (chat.reset()) to start over "
                                      f"keeping the context, or use overflow='drop-oldest'")
        if not turns:
            llm.check_length(len(ids))  # the system message and this one alone: fits or refuses
            return msgs, ids
        # drop the oldest user turn with its reply, so the history still alternates user/assistant
        drop = 2 if turns >= 2 and msgs[head + 1]["role"] == "assistant" else 1
        msgs = [*msgs[:head], *msgs[head + drop:]]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _record(toks: Iterator[int], into: list[int]) -> Iterator[int]:
    for t in toks:
        into.append(t)
        yield t


def _read_context(context: str | os.PathLike | None) -> str | None:
    """Text of context=: a path (Path, or a str naming an existing file) is read, any other str is the text."""
    if context is None:
        return None
    if isinstance(context, os.PathLike) or (len(context) < 4096 and "\n" not in context and os.path.isfile(context)):
        path = Path(context)
        if not path.is_file():
            raise ConfigError(f"context file {str(path)!r} does not exist; give a readable text file or the text")
        return path.read_text(encoding="utf-8", errors="replace")
    return context


def _session_tier(llm, share: float | None) -> tuple[TierConfig, dict]:
    """This session's TierConfig: the LLM's, with its budgets cut to share (or to what open sessions left)."""
    tier = llm.tier
    if not tier.has_budgets:
        return tier, {}
    if share is not None and not 0 < share <= 1:
        raise ConfigError(f"budget_share={share!r} must be a fraction in (0, 1]")
    others = [ch for ch in _SESSIONS.get(llm, ()) if not ch._closed]
    grant = {}
    for name in ("kv_gpu_budget", "cpu_budget"):
        total = getattr(tier, name)
        if total is None:
            continue
        taken = sum(ch._grant.get(name, 0) for ch in others)
        want = total - taken if share is None else int(total * share)
        if want > total - taken or want <= 0:
            raise BudgetError(f"{name}={format_size(total)} is shared by this LLM's chat sessions and {len(others)} "
                              f"open ones hold {format_size(taken)}; close one (chat.close()) or pass a smaller "
                              f"budget_share")
        grant[name] = want
    return tier.replace(**grant), grant


__all__ = ["Chat", "ChatClosedError", "OVERFLOW_POLICIES", "SessionError", "TurnStats", "common_prefix", "fit_history"]
