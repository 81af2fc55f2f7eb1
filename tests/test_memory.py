"""Giving freed heap memory back: malloc_trim where glibc is the allocator, a no-op elsewhere."""

from __future__ import annotations

import platform


from sclora.memory import release_freed_memory


def test_freed_memory_is_returned_where_glibc_allocates():
    assert release_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_the_statistics_pass_trims_after_every_batch_and_the_decomposition_per_weight_budget(monkeypatch):
    """Where the trims happen is what keeps the init's peak RSS down and deterministic (docs/performance.md):
    one after each statistics batch, one per TRIM_AFTER_BYTES of weights decomposed."""
    import sclora.methods.residual as residual
    import sclora.statistics as statistics
    from conftest import random_batches, tiny_llama

    from sclora import SCLoRAConfig, collect_covariances, get_sclora_model
    from sclora.targets import resolve_targets

    calls = []
    monkeypatch.setattr(statistics, "release_freed_memory", lambda: calls.append("stats"))
    monkeypatch.setattr(residual, "release_freed_memory", lambda: calls.append("init"))
    model = tiny_llama(seed=3)
    plus = collect_covariances(model, random_batches(n_batches=3), show_progress=False)
    minus = collect_covariances(model, random_batches(n_batches=2, seed=2), show_progress=False)
    assert calls == ["stats"] * 5
    config = SCLoRAConfig(r=2, beta=0.5)
    sizes = [m.weight.numel() * 8 for m in resolve_targets(model, config.target_modules).values()]
    budget = 3 * max(sizes)  # a trim every few modules
    monkeypatch.setattr(residual, "TRIM_AFTER_BYTES", budget)
    calls.clear()
    get_sclora_model(model, config, plus, minus, show_progress=False)
    expected, pending = 0, 0
    for size in sizes:
        pending += size
        if pending >= budget:
            expected, pending = expected + 1, 0
    assert 0 < expected < len(sizes) and calls == ["init"] * expected
