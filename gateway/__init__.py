"""``swapmoe.gateway``: the OpenAI-compatible HTTP gateway in front of executors, its own process
(``openai_http``, the ASGI app, over ``openai_api``, ``http_intake`` and ``executor_pool``).
``swapmoe http serve`` (``swapmoe.cli.http_commands``) starts it.
"""
