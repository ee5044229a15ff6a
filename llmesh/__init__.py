"""llmesh: LLM inference as a mesh of gRPC services.

The project's one import namespace. Its folders stay at the repository's top level
(kernels/, services/, mesh/, observability/, benchmarks/) and are this package's
subpackages through the links beside this file, so nothing the project installs
is importable as a bare `kernels` or `services` that could shadow, or be shadowed
by, another distribution (transformers depends on one called `kernels`). The
top-level folders have no __init__.py for the same reason: from the repository
root, a bare `import kernels` finds the installed distribution, not them.
llmesh/v1/ holds the code generated from protos/ (`make protos`).
"""
