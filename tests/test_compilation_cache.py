"""JAX's persistent compilation cache, as medjax commands (and this test session) turn it on: a
second run of the same config loads its train step instead of compiling it."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trains twice in-process and once in a subprocess


def test_a_second_run_of_the_same_config_loads_its_programs(make_config, tmp_path):
    import jax.monitoring

    from medjax.train.loop import train

    events = []
    listener = lambda event, **kwargs: events.append(event)  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        # A shape no other test trains, so the first run cannot be served by another test's compile.
        cfg = lambda name: make_config(tmp_path / name, "train.max_steps=2", "data.seq_len=40")  # noqa: E731
        train(cfg("first"))
        first_hits = events.count("/jax/compilation_cache/cache_hits")
        events.clear()
        train(cfg("second"))
        second_hits = events.count("/jax/compilation_cache/cache_hits")
    finally:
        jax.monitoring.unregister_event_listener(listener)
    # The train, eval and init programs the first run compiled (and wrote) are read back.
    assert second_hits >= first_hits + 2, (first_hits, second_hits)


def test_the_cache_can_be_turned_off():
    code = (
        "import os; from medjax.utils import use_compilation_cache; "
        "print(use_compilation_cache(), os.environ.get('JAX_COMPILATION_CACHE_DIR'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "MEDJAX_COMPILATION_CACHE": "off"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["None", "None"]
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "MEDJAX_COMPILATION_CACHE": "/some/dir"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["/some/dir", "/some/dir"]
