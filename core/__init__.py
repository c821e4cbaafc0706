"""``swapmoe.core``: the plain types and arithmetic every process shares.

Plans, model layouts, memory reports, the budget arithmetic, sizes and the error types
that name a bad field. No gRPC, no torch, no threads: the executor, the planner's search
and the performance models all build on this, and ``swapmoe.rpc.convert`` is the one place
these types meet their protos.
"""
