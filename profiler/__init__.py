"""``swapmoe.profiler``: offline measurements (memory, latency, load bandwidth, accuracy under
random plans) and the performance models the planner's search uses. Empty until the profiler
issue lands; the executor's own on-device measurements are ``swapmoe.executor.device_profiling``.
"""
