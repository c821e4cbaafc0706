"""The paper's evaluation (SwapMoE, arXiv 2308.15030, section 4), reproduced on our models.

    python -m benchmarks.paper            # everything; writes benchmarks/results/paper/
    python -m benchmarks.paper --quick    # the same tables and figures from fewer tokens, in minutes
                                          # (into .bench-stores/paper-quick/)
    python -m benchmarks.paper --render   # the report again from results.json, measuring nothing

Each section module measures (``measure(ctx) -> dict``, plain JSON) and renders
(``render(results, figures) -> list[str]``, Markdown lines, figures drawn from the results
alone), so the report is a function of what one run measured: ``report.py`` assembles it, and
the test suite re-renders it from the stored results to hold it to that.
"""
