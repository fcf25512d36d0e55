"""The train step's compilation: JAX's persistent compilation cache, and a timed compile that
tells whether the program came out of that cache.

A run compiles its step (and its sampling and validation programs) from scratch in every new
process: on a TPU slice that is minutes per restart, after each preemption. With the cache, a
restart with an unchanged program loads the compiled executable from disk instead.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

# Programs that compile faster than this are not written to the cache: the run's small jits
# (the key, the state's creation) gain nothing worth a file each.
MIN_COMPILE_SECONDS = 1.0

_REQUESTS = "/jax/compilation_cache/compile_requests_use_cache"
_HITS = "/jax/compilation_cache/cache_hits"


def cache_directory(configured: str, jax_setting: str | None) -> str | None:
  """The cache folder a run uses: JAX's own setting when it has one (`JAX_COMPILATION_CACHE_DIR`
  or a caller's `jax.config.update`, so that a launcher or a test suite can redirect it), else the
  config's `compilation_cache_dir` with `~` expanded; None (no cache) when both are empty."""
  if jax_setting:
    return jax_setting
  return os.path.expanduser(configured) if configured else None


def use_persistent_cache(configured: str) -> str | None:
  """Turns JAX's persistent compilation cache on for this process as `cache_directory` says;
  returns the folder, or None when the cache stays off. Called before the run compiles anything
  (JAX reads the setting at its first compile)."""
  current = jax.config.jax_compilation_cache_dir
  directory = cache_directory(configured, current)
  if directory and directory != current:
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return directory


@dataclasses.dataclass(frozen=True)
class TimedCompile:
  """A compiled program, the seconds its tracing and lowering took and those of its compilation
  (or of its load from the cache), and where it came from: "cache" (the persistent cache),
  "compiled" (a cache miss: compiled, and written to the cache when the compilation took at least
  the cache's minimum) or "uncached" (no cache in use)."""

  executable: Any
  lower_seconds: float
  compile_seconds: float
  source: str


def compile_timed(jitted, *args) -> TimedCompile:
  """Lowers and compiles `jitted` for `args`, timing it and listening to JAX's cache events."""
  events = []
  listener = lambda event, **_: events.append(event)
  jax.monitoring.register_event_listener(listener)
  try:
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    lowered_at = time.perf_counter()
    executable = lowered.compile()
    compiled_at = time.perf_counter()
  finally:
    jax.monitoring.unregister_event_listener(listener)
  requests, hits = events.count(_REQUESTS), events.count(_HITS)
  source = "uncached" if not requests else "cache" if hits >= requests else "compiled"
  return TimedCompile(executable, lowered_at - start, compiled_at - lowered_at, source)
