"""Load's per-class warm-up (kv/sparse/warm.py): the classes it walks (kv/factory.capacity_classes) and the step
it runs for each (on the CPU the torch kernels; the Triton compile itself is checked by bench/profile_first_call.py
on a GPU)."""

import torch

from tierkv.config import TierConfig
from tierkv.kv.factory import capacity_class, capacity_classes
from tierkv.kv.sparse.warm import warm_class
from tierkv.models.build import random_model
from tierkv.models.shapes import shape_config
from tests.kv.helpers import new_sparse_cache


def test_the_classes_are_every_class_up_to_the_context_in_order():
    classes = capacity_classes(131072, 131073)
    assert classes[:5] == [1024, 1280, 1536, 1792, 2048] and classes[-1] == 131072
    assert len(classes) == 4 * 7 + 1  # four per octave from 1K to 128K
    assert all(capacity_class(need, 131073) in classes for need in (1, 5000, 40000, 99999, 131072))


def test_a_class_step_lists_as_many_entries_as_the_cache_of_that_class():
    model = random_model(shape_config("llama-tiny"), "cpu", torch.float32)
    cfg, tier = model.cfg, TierConfig(attention="sparse")
    for cap in (5120, 40960):
        slots = warm_class(cfg, tier, cap, torch.device("cpu"), torch.float32)
        cache = new_sparse_cache(model, tier, cap)
        fixed = cache.sink_chunks + cache.window_chunks + 1
        assert slots.shape == (cfg.num_kv_heads, fixed + cache.max_picks)
        cache.close()
