"""llmesh: a gRPC mesh of Python services that runs LLM agents on local llama.cpp models.

gRPC's fork handlers are off in every process that imports llmesh, unless
``GRPC_ENABLE_FORK_SUPPORT`` is set explicitly. The services start processes
(the tools sandbox, the launcher) but never use gRPC in a forked child; with
the handlers on, grpcio restarts its epoll poller in the child between fork
and exec, and the child dies (EBADF, exit 135) when subprocess closes the
inherited descriptors before exec. This must run before grpc is imported,
which importing any ``services`` module first guarantees.
"""
import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
