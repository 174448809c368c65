"""Prefill layer after layer into the sparse graph cache (docs/ARCHITECTURE.md, "Prefill").

Slice after slice, every prefill slice of every layer attends all earlier tokens, which the sparse cache keeps in
host memory: at 128K on the 8B shape that re-read the context over the host link 64 times per layer (26 of 38 s
of prefill on an H200) and left the shadow fit (8 s) to the first decode step. Layer after layer
(`LlamaModel.forward_by_layer`), one layer's K, V and pre-RoPE keys for the whole prompt stay on the compute
device: its slices attend them there, then the layer is written to the host pool once and its shadow and index
are fitted from the device copies. The same slices see the same keys in the same order, so logits equal the
slice-after-slice prefill's. A mixin of SparseKVCache: it uses the cache's pool, ring, resident copies and fit.
"""

from __future__ import annotations

import torch

from tierkv.kernels.span_attention import causal_gqa_attention

# device memory a layer-major prefill leaves free on CUDA beyond its own buffers (the slices' activations)
LAYER_PREFILL_RESERVE = 2 * 1024**3


class LayerStaging:
    """One layer's K, V and pre-RoPE keys (n, Hkv, D) for a whole prompt on the compute device, filled slice by
    slice; `layer` is the layer being filled and `filled` how many tokens of it are in."""

    def __init__(self, n: int, num_kv_heads: int, head_dim: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (n, num_kv_heads, head_dim)
        self.k, self.v, self.k_pre = (torch.empty(shape, device=device, dtype=dtype) for _ in range(3))
        self.n, self.layer, self.filled = n, 0, 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor) -> None:
        """Add the next T tokens of `layer` (layers come in order, each filled whole before the next). Mutates."""
        if self.filled == self.n:
            self.layer, self.filled = self.layer + 1, 0
        if layer != self.layer:
            raise RuntimeError(f"layer-major prefill expected layer {self.layer}, got layer {layer}")
        s, e = self.filled, self.filled + k.shape[0]
        self.k[s:e], self.v[s:e], self.k_pre[s:e] = k, v, k_pre
        self.filled = e

    @staticmethod
    def nbytes(n: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 3 * n * num_kv_heads * head_dim * dtype.itemsize


class LayerPrefillSteps:
    """SparseKVCache's layer-major prefill; `staging` is None outside one. `_lent` is set while the resident value
    copies are freed for one (what they were: addresses, chunks, keys)."""

    staging: LayerStaging | None = None
    _lent: tuple | None = None

    def begin_layer_prefill(self, n: int, activation_bytes: int, device_limit: int | None = None) -> bool:
        """Take the next prefill of n tokens layer after layer when the cache is empty and the device has room for
        the staging buffers plus `activation_bytes` (the model's whole-prompt residual stream). device_limit: the
        most bytes torch may have allocated on the device meanwhile (load's gpu_budget less what its plan keeps for
        a slice's activations and workspace; None: only free device memory counts). Where the buffers do not fit
        under it, the resident value copies (empty before a prefill, and most of a tight budget) are freed for the
        prefill and refilled from the host pool after it (`end_layer_prefill`). Mutates."""
        if self.seq_len or self.disk_chunks is not None or n > self.capacity:
            return False
        need = LayerStaging.nbytes(n, self.hkv, self.d, self.dtype) + activation_bytes
        lend = False
        if self.device.type == "cuda":
            held = self.res.nbytes if self.res is not None else 0
            if device_limit is not None:
                allocated = torch.cuda.memory_allocated(self.device)
                if allocated + need > device_limit:
                    if allocated - held + need > device_limit:
                        return False
                    lend = True
            if need + LAYER_PREFILL_RESERVE > torch.cuda.mem_get_info(self.device)[0] + (held if lend else 0):
                return False
        if lend:
            self._lent = self._resident_layout()
            self.res = None
            self._n["resident_lent"] = self._n.get("resident_lent", 0) + 1
        self.staging = LayerStaging(n, self.hkv, self.d, self.device, self.dtype)
        self._n["layer_prefills"] = self._n.get("layer_prefills", 0) + 1
        return True

    def end_layer_prefill(self) -> None:
        """After a layer-major prefill (or its failure): the resident copies freed for it come back, filled from the
        host pool. Where they land where they were, a captured decode graph stays valid."""
        self.staging = None
        if self._lent is None:
            return
        lent, self._lent = self._lent, None
        _, _, keys, _ = lent
        epoch = self.buffers_epoch
        self._alloc_resident(keys=keys)
        if self._resident_layout() == lent:
            self.buffers_epoch = epoch
        self.res.copy_from(self.k_host, self.v_host, self.seq_len)
        if self.fitted:  # what _finish_fit skipped while the copies were lent
            self._keep_outlier_keys(self.seq_len + 1)

    def _resident_layout(self) -> tuple:
        """What a captured graph reads of the resident copies: their addresses and first chunk, and whether keys
        are kept."""
        r = self.res
        return r.v.data_ptr(), r.k.data_ptr() if r.k is not None else 0, r.k is not None, r.start

    def attends_whole_layer(self, layer: int) -> bool:
        # on CUDA one fused causal GQA call per layer runs at about twice the FLOP rate of per-slice spans
        # (bench/staged_attention.py); the CPU keeps the sliced spans, bit-equal to the sliced prefill (tests)
        return self.staging is not None and self.device.type == "cuda"

    def attend_layer(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        st = self.staging
        if st.layer != layer or st.filled != st.n:
            raise RuntimeError(f"whole-layer attention of layer {layer} before its {st.n} tokens were staged")
        out = causal_gqa_attention(q, st.k, st.v)
        self._write_staged_layer(layer)
        return out

    def _stage(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor) -> None:
        self.staging.write(layer, k, v, k_pre)

    def _attend_staged(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The slice just staged attends every staged token up to its own, causally, on the device; the layer is
        written out once its last slice has attended."""
        st = self.staging
        # one span for all earlier keys: they are on the device already, and a non-causal span folds the query
        # group into the query length instead of repeating K/V (tierkv/kernels/span_attention.py)
        # (the CPU keeps the sliced prefill's spans, so there the two prefills stay equal to the bit: tests)
        span = st.n if self.device.type == "cuda" else None
        out = self._exact_over(q, st.filled, lambda s, e: (st.k[s:e], st.v[s:e]), True, span)
        if st.filled == st.n:
            self._write_staged_layer(layer)
        return out

    def _write_staged_layer(self, layer: int) -> None:
        """Write the staged layer to the host pool, the resident copies and the key ring, and fit its shadow and
        index when the next step will be sparse (else its pre-RoPE keys wait on the host, as a sliced prefill's do)."""
        st, n = self.staging, self.staging.n
        k_pool, v_pool = self.pool_layer(layer)  # pins this layer's part while the GPU works on earlier ones
        k_pool[:n].copy_(st.k)
        v_pool[:n].copy_(st.v)
        if self.res is not None:  # (None while lent to this prefill: end_layer_prefill fills them)
            k_res, v_res = self.res.flat(layer)
            first = self.res.start * self.chunk
            if first < n:  # resident copies hold the last chunks: rows count from their first token
                v_res[:n - first].copy_(st.v[first:])
                if k_res is not None:
                    k_res[:n - first].copy_(st.k[first:])
        lo = max(0, n - self.ring)  # the ring holds the newest pre-RoPE keys (position mod ring)
        at = torch.arange(lo, n, device=self.device)
        self.k_pre[layer].index_copy_(0, at.remainder(self.ring), st.k_pre[lo:])
        if self._plan(n + 1).dense:
            self._fit_buf[layer].append(st.k_pre.to("cpu"))
        else:
            self._fit_keys(layer, n, st.k_pre, st.k)
        if layer == self.num_layers - 1:
            self.staging = None
            if not self._plan(n + 1).dense:
                self._finish_fit(n + 1)
