"""Benchmarks of the project's own code paths; run each from the repository root as a module,
e.g. `python -m benchmarks.predict_throughput --help`. Numbers and commands: benchmarks/README.md.

Importing `src` here, before any benchmark module loads torch, runs `runtime.before_torch()`
(libgomp reads its spin count once, when torch loads it)."""
import src  # noqa: F401
