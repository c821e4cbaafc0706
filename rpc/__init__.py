"""``swapmoe.rpc``: the gRPC plumbing every process shares.

``convert`` (the one place core types meet their protos), ``status`` (exceptions to
statuses) and ``transport`` (servers and channels with health, reflection, keepalive).
The contract itself is ``swapmoe.v1``, generated from ``protos/swapmoe/v1/*.proto``.
"""
