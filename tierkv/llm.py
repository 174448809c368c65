"""The public entry: `load()` and the `LLM` object (generate, stream, tokenizer, stats, close)."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from tierkv.config import TierConfig
from tierkv.detokenize import TextStream
from tierkv.engine import DecodeStep, GenStats, eager_step, generate_ids, prefill
from tierkv.errors import ConfigError, ContextTooLongError
from tierkv.graph import GraphStep
from tierkv.kv.caches.base import KVCache
from tierkv.kv.factory import CacheRequest, build_cache, capacity_class, capacity_classes, choose
from tierkv.kv.sparse.model_defaults import with_model_defaults
from tierkv.models.build import build_model, random_model
from tierkv.models.config import ModelConfig
from tierkv.models.llama import LlamaModel
from tierkv.models.shapes import SHAPES, shape_config
from tierkv.models.names import context_limit, find_model
from tierkv.models.weights import TensorSource, resolve_model
from tierkv.plan.load import Offload, weight_stats
from tierkv.oom import guard_memory
from tierkv.inputs import require_text
from tierkv.sample import Sampler
from tierkv.sample_config import SamplingConfig, sampling_config
from tierkv.stop_text import StopText

if TYPE_CHECKING:
    from tierkv.chat import Chat

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """cuda when available and not told otherwise; refuse unknown or unavailable devices."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is unknown; use 'cpu' or 'cuda' (or 'cuda:N')") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but this torch build sees no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on the CPU by default; accept names like 'bf16', 'float32'."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise ConfigError(f"dtype {dtype!r} is not supported; use bf16, fp16 or fp32")


def peak_memory(device: torch.device) -> int:
    """Peak bytes: torch's allocator on CUDA, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class LLM:
    """A loaded model, its tokenizer and its tier settings. Not thread-safe."""

    def __init__(self, model: LlamaModel, tokenizer, tier: TierConfig, source: str,
                 stop_ids: Sequence[int] = (), graph: bool = True) -> None:
        self.model, self.tokenizer, self.tier, self.source = model, tokenizer, tier, source
        self.cfg: ModelConfig = model.cfg
        self.device, self.dtype = model.device, model.dtype
        self.stop_ids = set(stop_ids)
        self.context_size = self.cfg.max_position_embeddings  # load(ctx_size=) caps it
        self.last_stats = GenStats()
        self._caches: list[KVCache] = []
        # per use, the fixed-capacity cache of the last call and its decode step (a captured graph on CUDA): a call
        # in the same capacity class reuses both (kv/factory.capacity_class), so a graph is captured once
        self._kept: dict[str, tuple[KVCache, object]] = {}
        self.graph = graph
        self.plan = None  # the planner's Plan when load() was given gpu_budget

    # --- caches -------------------------------------------------------------------------------
    def cache_request(self, capacity: int, use: str = "generate", tier: TierConfig | None = None) -> CacheRequest:
        """What the factory (tierkv/kv/factory.py) is asked for: this LLM's model, device and graph setting."""
        return CacheRequest(tier=tier or self.tier, model=self.cfg, device=self.device, dtype=self.dtype,
                            graph=self.graph, use=use, capacity=capacity)

    @property
    def uses_graph(self) -> bool:
        """Whether one-shot generation replays a captured CUDA graph (the factory's choice for this LLM)."""
        return choose(self.cache_request(1)).captured and self.weights_capturable

    def call_cache(self, need: int, use: str) -> KVCache:
        """A cache for one generate/score call of `need` positions: the kept one of its capacity class, emptied
        (graphs captured for it stay valid), or a new one. Fixed-capacity caches are kept for the next call (one
        per use); others are released after the call (`end_call`)."""
        kept = self._kept.get(use)
        if kept is not None and kept[0].capacity == capacity_class(need, self.cfg.max_position_embeddings + 1):
            kept[0].truncate(0)
            kept[0].reset_stats()
            return kept[0]
        if kept is not None:
            self.release_cache(kept[0])
        cache = self.new_cache(need, use=use)
        if cache.fixed_capacity:
            self._kept[use] = (cache, None)
        return cache

    @property
    def device_limit(self) -> int | None:
        """The most device bytes torch may hold while a prefill runs layer after layer: load's gpu_budget less
        what its plan keeps for a slice's activations and the workspace (None without gpu_budget, or off CUDA)."""
        if self.plan is None or self.device.type != "cuda":
            return None
        return self.plan.budgets["gpu"] - self.plan.gpu["activations"] - self.plan.gpu["workspace"]

    @property
    def weights_capturable(self) -> bool:
        """Whether the layer weights allow a captured decode step: resident, or streamed from pinned memory (disk
        reads and CPU-computed layers wait on the host, so their decode runs eagerly)."""
        return self.model.weights is None or self.model.weights.capturable

    def decode_step(self, cache: KVCache, use: str, graph: bool) -> DecodeStep:
        """The decode step for a call's cache: its kept graph step when graph and the factory captures, captured
        at most once per kept cache (tierkv/graph.py recaptures only when the cache reallocated what it reads)."""
        if not (graph and cache.path["captured"] and self.weights_capturable):
            return eager_step(self.model, cache)
        kept = self._kept.get(use)
        if kept is None or kept[0] is not cache:
            return GraphStep(self.model, cache)
        if kept[1] is None:
            self._kept[use] = (cache, GraphStep(self.model, cache))
        return self._kept[use][1]

    def kept(self, use: str) -> tuple[KVCache | None, object]:
        """The cache (and decode step, None until a captured one was made) kept for the next `use` call."""
        return self._kept.get(use, (None, None))

    def end_call(self, cache: KVCache) -> None:
        """Release a call's cache unless it is kept for the next call."""
        if all(cache is not kept for kept, _ in self._kept.values()):
            self.release_cache(cache)

    @property
    def newest_cache(self) -> KVCache | None:
        """The open cache made last (the one a running generate call decodes with), or None."""
        return self._caches[-1] if self._caches else None

    def new_cache(self, capacity: int, *, use: str = "generate", tier: TierConfig | None = None) -> KVCache:
        """A fresh KV cache for one sequence, chosen by tierkv/kv/factory.py for `use` (generate, chat, score)
        from `tier` (default: the LLM's). Registered with the LLM: llm.close() closes it."""
        cache, _ = build_cache(self.cache_request(capacity, use, tier), self.model.rope)
        self._caches.append(cache)
        return cache

    # --- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: str | None = None, messages: Sequence[dict] | None = None) -> list[int]:
        """Token ids of a plain prompt, or of chat messages rendered by the model's chat template."""
        if (prompt is None) == (messages is None):
            raise ConfigError("give exactly one of prompt= or messages=")
        if messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ConfigError(f"model {self.source!r} has no chat template; pass prompt= instead of messages=")
            require_text(" ".join(str(m.get("content", "")) for m in messages), "the messages")
            out = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        require_text(prompt, "the prompt")
        # the tokenizer's own special tokens (a BOS where the model expects one: Gemma, Llama), once: a prompt that
        # already starts with the BOS text does not get a second
        ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None and ids[:2] == [bos, bos]:
            ids = ids[1:]
        return ids

    def check_length(self, n_prompt: int) -> None:
        limit = self.context_size
        if n_prompt >= limit:
            raise ContextTooLongError(
                f"prompt has {n_prompt} tokens but the context is {limit} tokens; shorten the prompt")

    # --- generation ---------------------------------------------------------------------------
    @guard_memory(lambda llm: llm.tier, lambda llm: llm.device)  # out of memory: one error naming the budget
    def stream_ids(self, ids: Sequence[int], *, sampling: SamplingConfig | None = None, progress: bool = False,
                   **options) -> Iterator[int]:
        """Prefill ids in chunks, then yield new token ids. options: SamplingConfig fields (max_new_tokens,
        temperature, top_p, top_k, min_p, repeat_penalty, seed), applied over `sampling`."""
        cfg = sampling_config(sampling, **options)
        self.check_length(len(ids))
        max_new = min(cfg.max_new_tokens, self.context_size - len(ids))
        stats = self.last_stats = GenStats(prompt_tokens=len(ids))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        cache = self.call_cache(len(ids) + max_new + 1, "generate")
        stats.extra["cache_setup_s"] = time.perf_counter() - t0  # a new capacity class allocates and pins here
        try:
            t0 = time.perf_counter()
            x = torch.tensor(list(ids), dtype=torch.long, device=self.device)
            logits = prefill(self.model, x, cache, self.tier.prefill_chunk, progress=progress,
                              device_limit=self.device_limit)
            logits.sum().item()  # wait for prefill so its time is not billed to decode
            stats.prefill_s = time.perf_counter() - t0
            step = self.decode_step(cache, "generate", graph=max_new > 1)
            if self.model.weights is not None:  # weight traffic of the decode steps only
                self.model.weights.reset_stats()
            yield from generate_ids(step, logits, len(ids), max_new, self.stop_ids, stats,
                                    sampler=Sampler(cfg, self.device, ids))
            if stats.stop_reason == "max_new_tokens" and max_new < cfg.max_new_tokens:
                stats.stop_reason = "context_full"
        finally:
            stats.extra["peak_memory"] = peak_memory(self.device)
            stats.extra["kv"] = cache.stats()
            if self.model.weights is not None:
                stats.extra["weights"] = weight_stats(self, stats)
            self.end_call(cache)

    def stream(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
               sampling: SamplingConfig | None = None, progress: bool = False, **options) -> Iterator[str]:
        """Yield the reply as text pieces while it is generated. options: SamplingConfig fields (max_new_tokens,
        temperature, top_p, top_k, min_p, repeat_penalty, stop, seed), applied over `sampling`."""
        cfg = sampling_config(sampling, **options)
        ids = self.encode(prompt, messages)
        stops = StopText(cfg.stop)
        yield from self.detokenize(self.stream_ids(ids, sampling=cfg, progress=progress), stops)
        if stops.hit is not None:
            self.last_stats.stop_reason = "stop_string"

    def generate(self, prompt: str | None = None, *, messages: Sequence[dict] | None = None,
                 sampling: SamplingConfig | None = None, **options) -> str:
        """The whole reply as one string (stop tokens and stop strings removed); options as for stream()."""
        return "".join(self.stream(prompt, messages=messages, sampling=sampling, **options))

    def detokenize(self, toks: Iterator[int], stops: StopText | None = None) -> Iterator[str]:
        """Turn a stream of ids into text pieces, holding back incomplete UTF-8 sequences and text that may
        become a stop string; at a stop string the token stream is closed (generation ends)."""
        stops, stream = stops or StopText(), TextStream(self.tokenizer)
        for t in toks:
            if t in self.stop_ids:
                break
            if not stream.feed(t):
                continue
            piece = stops.feed(stream.text)
            if piece:
                yield piece
            if stops.hit is not None:
                toks.close()
                return
        stream.finish()
        piece = stops.flush(stream.text)
        if piece:
            yield piece

    def chat(self, system: str | None = None, context: str | Path | None = None, **options) -> "Chat":
        """A multi-turn session whose KV cache persists between turns (tierkv.chat.Chat; options go to it)."""
        from tierkv.chat import Chat  # chat sits above llm; imported on use

        return Chat(self, system=system, context=context, **options)

    # --- accuracy ------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, token_ids: Sequence[int], prefill_len: int) -> torch.Tensor:
        """Teacher-forced log-probabilities through the decode path.

        Prefills token_ids[:prefill_len], then feeds the rest one token at a time through the configured
        cache (full or sparse). Row i of the (len - prefill_len, vocab) float32 CPU result is the
        log-distribution of token prefill_len + i given all tokens before it (row 0 from the prefill).
        """
        n = len(token_ids)
        if not 0 < prefill_len < n:
            raise ConfigError(f"prefill_len={prefill_len} must be between 1 and len(token_ids)-1={n - 1}")
        self.check_length(n)
        cache = self.call_cache(n + 1, "score")
        try:
            x = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
            rows = [prefill(self.model, x[:prefill_len], cache, self.tier.prefill_chunk,
                            device_limit=self.device_limit)[-1]]
            step = eager_step(self.model, cache)
            for pos in range(prefill_len, n - 1):
                rows.append(step(x[pos:pos + 1], pos)[-1])
            self.last_stats = GenStats(prompt_tokens=prefill_len, new_tokens=n - prefill_len)
            self.last_stats.extra["kv"] = cache.stats()
            return torch.log_softmax(torch.stack(rows).float(), dim=-1).cpu()
        finally:
            self.end_call(cache)

    # --- lifetime -----------------------------------------------------------------------------
    def release_cache(self, cache: KVCache) -> None:
        """Close a cache made by `new_cache`/`call_cache` (its files removed) and forget it, kept or not."""
        cache.close()
        if cache in self._caches:
            self._caches.remove(cache)
        self._kept = {use: kept for use, kept in self._kept.items() if kept[0] is not cache}

    def warm_up(self, tokens: int = 4096) -> float:
        """Run one short throwaway generate call (random ids, a sparse context at default settings) so the kernels
        a decode step uses are compiled or read from Triton's on-disk cache, and CUDA and cuBLAS are initialised,
        before the user's first call; with the sparse cache, also the selection kernels of every capacity class up
        to the context size. Leaves no cache, graph or stats behind. Returns its seconds. `load` calls it
        on CUDA unless warm_up=False; on the CPU there is nothing to compile."""
        t0 = time.perf_counter()
        n = min(tokens, self.context_size - 8)
        ids = torch.randint(0, self.cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0)).tolist()
        for _ in self.stream_ids(ids, max_new_tokens=4):
            pass
        kept, _ = self._kept.get("generate", (None, None))
        if kept is not None:
            self.release_cache(kept)
        self.last_stats = GenStats()
        if self.device.type == "cuda" and choose(self.cache_request(1)).kind == "sparse":
            # the selection kernels specialise per capacity class: compile every class this LLM can reach now,
            # not inside the first call's graph capture (kv/sparse/warm.py)
            from tierkv.kv.sparse.warm import warm_classes

            classes = capacity_classes(self.context_size, self.cfg.max_position_embeddings + 1)
            warm_classes(self.cfg, self.tier, classes, self.device, self.dtype)
        return time.perf_counter() - t0

    @property
    def stats(self) -> dict:
        """Numbers of the last generate call."""
        s = self.last_stats
        return {"prompt_tokens": s.prompt_tokens, "new_tokens": s.new_tokens, "prefill_tok_s": s.prefill_tok_s,
                "decode_tok_s": s.decode_tok_s, "decode_ms_per_token": s.decode_ms_per_token,
                "prefill_s": s.prefill_s, "decode_s": s.decode_s, "first_step_s": s.first_step_s,
                "stop_reason": s.stop_reason, **s.extra}

    def close(self) -> None:
        """Close every open cache (removing its files). The LLM stays usable for new calls."""
        for cache in list(self._caches):
            self.release_cache(cache)

    def unload(self) -> None:
        """close(), and release the weight streamer (its thread, spill file and pinned blocks). The LLM is unusable
        afterwards."""
        self.close()
        if self.model.weights is not None:
            self.model.weights.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stop_ids(tokenizer, hf_cfg) -> list[int]:
    ids = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(hf_cfg, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return sorted(ids)


def load(model: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, *, graph: bool = True, progress: bool = False,
         ctx_size: int | None = None, gpu_budget: int | str | None = None, placement=None,
         warm_up: bool = True, **tier_settings) -> LLM:
    """Load a model folder, a .gguf file, a built-in shape with random weights, a Hugging Face id found in the
    local Hugging Face cache, or the default model (None or its name, see tierkv.models.names).

    graph=False keeps decode eager on CUDA (the reference path). ctx_size caps the context (prompt + reply).
    On CUDA a short throwaway call warms the decode kernels (LLM.warm_up) unless warm_up=False.
    tier_settings are TierConfig fields (kv_gpu_budget, cpu_budget, disk_dir, chunk_size, attention, ...); a model
    whose keys are narrow gets its own rank, score_rank and chunk_size unless given (kv/sparse/model_defaults.py).
    gpu_budget ('12GiB' or bytes) covers everything on the compute device: the planner (tierkv/plan/) decides
    at load which layers stay resident, stream from pinned host memory or disk (disk_dir), or run on the CPU,
    and kv_gpu_budget and the attention mode follow from its plan unless given (`llm.plan` holds it). The plan is
    made for ctx_size tokens (default: the model's whole context).
    placement overrides where layers go (tierkv.weights.store.parse_placement: 'host=3,7 disk=5 cpu=9', one
    place per layer, or {layer: place}); with gpu_budget too, it replaces only the plan's layer placement.
    Blocks while weights load; a GGUF is converted once into the cache directory.
    """
    context_limit(ctx_size, 1 << 62)  # a malformed ctx_size is refused before the weights load
    offload = Offload(gpu_budget, placement, ctx_size)
    llm = _load(find_model(model), device, dtype, graph, progress, tier_settings, offload)
    llm.context_size = context_limit(ctx_size, llm.cfg.max_position_embeddings)
    if warm_up and llm.device.type == "cuda":
        llm.warm_up()
    return llm


def _load(model: str | Path | None, device, dtype, graph: bool, progress: bool, tier_settings: dict,
          offload: "Offload") -> LLM:
    tier = TierConfig(**tier_settings)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if isinstance(model, str) and model in SHAPES:
        cfg = shape_config(model)
        tier = with_model_defaults(tier, cfg, tier_settings)
        tier, placer = offload.prepare(cfg, dev, dt, tier, tier_settings, index=None)
        net = random_model(cfg, dev, dt, placer=placer, progress=progress)
        llm = LLM(net, _ByteTokenizer(cfg.vocab_size), tier, source=f"shape:{model}", graph=graph)
        llm.plan = offload.plan
        return llm
    from transformers import AutoConfig, AutoTokenizer

    folder = resolve_model(model)
    hf_cfg = AutoConfig.from_pretrained(str(folder))
    cfg = ModelConfig.from_hf(hf_cfg, name=str(model or "SmolLM2-135M-Instruct"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    src = TensorSource(folder)
    tier = with_model_defaults(tier, cfg, tier_settings)
    tier, placer = offload.prepare(cfg, dev, dt, tier, tier_settings, index=src)
    net = build_model(cfg, lambda name: src.get(name, dev, dt), progress=progress, placer=placer,
                      get_at=lambda name, at: src.get(name, at, dt))
    llm = LLM(net, tokenizer, tier, source=str(folder), stop_ids=_stop_ids(tokenizer, hf_cfg), graph=graph)
    llm.plan = offload.plan
    return llm


class _ByteTokenizer:
    """Stand-in tokenizer for random-weight shapes: ids are bytes modulo the vocabulary."""

    chat_template = None
    eos_token_id = None

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [b % self.vocab for b in text.encode()]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")



