"""The SwapMoE contract: generated gRPC stubs (``swapmoe.v1``) and the in-process
types they carry (plans, model layouts, sizes), converted in one place."""
