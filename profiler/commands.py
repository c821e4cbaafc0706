"""``swapmoe profile ...``: run accuracy and device profiling, and show stored profiles."""

from __future__ import annotations

from pathlib import Path


def accuracy(args) -> None:
    """Score random configurations on Ray, then fit E_accuracy and print the summary."""
    from swapmoe.profiler.accuracy import AccuracyProfiler, AccuracyRun
    from swapmoe.profiler.report import finish_accuracy
    from swapmoe.profiler.workloads import ProfilingSet

    model = Path(args.model)
    kind = args.set or ("summarization" if _is_encoder_decoder(model) else "lm")
    profiling_set = ProfilingSet(kind, texts=args.texts, tokens=args.tokens, pairs=args.pairs)
    run = AccuracyRun(model, profiling_set, configurations=args.configurations, seed=args.seed,
                      workers=args.workers, root=args.root, ray_address=args.ray_address,
                      max_resident_bytes=args.max_resident)
    profiler = AccuracyProfiler(run)
    profiler()
    finish_accuracy(profiler.directory, profiler.fingerprint)
    print((profiler.directory / "summary.md").read_text())
    print(f"profile: {profiler.directory}")


def device(args) -> None:
    """Profile an executor (directly, or through its planner for a device behind NAT) and store it."""
    from swapmoe.cli.client import fetch_device_profile
    from swapmoe.profiler.report import save_device

    profile = fetch_device_profile(executor=args.executor, planner=args.planner, node_id=args.node_id,
                                   repeats=args.repeats, sweep_tokens=args.sweep_tokens)
    directory = save_device(args.root, profile)
    print((directory / "summary.md").read_text())
    print(f"profile: {directory}")


def show(args) -> None:
    from swapmoe.profiler import artifacts
    from swapmoe.profiler.report import load_device, show

    directory = Path(args.directory)
    print(show(directory))
    if args.plots is None:
        return
    from swapmoe.profiler.plots import accuracy_plot, sweep_plot

    out = Path(args.plots)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if (directory / "device.json").exists():
        written.append(sweep_plot(load_device(directory), out / "update_frequency_sweep.png"))
    else:
        meta = artifacts.read_json(directory / "profile.json", "accuracy-profile")
        rows = artifacts.read_scores(directory / artifacts.SCORES)
        for workload in sorted(rows[0]["accuracy"]) if rows else []:
            written.append(accuracy_plot(rows, workload, meta["num_experts"], out / f"accuracy_{workload}.png"))
    for path in written:
        print(f"wrote {path}")


def _is_encoder_decoder(model: Path) -> bool:
    import json

    config = model / "config.json"
    if not config.is_file():
        raise ValueError(f"--model {model} is not a checkpoint directory (no config.json)")
    return bool(json.loads(config.read_text()).get("is_encoder_decoder"))


def add_parser(commands) -> None:
    """The ``profile`` command group, on the ``swapmoe`` parser's subcommands."""
    from swapmoe.cli.addresses import EXECUTOR_PORT, PLANNER_PORT, address_type
    from swapmoe.cli.arg_types import size
    from swapmoe.profiler.artifacts import default_root

    group = commands.add_parser("profile", help="device and accuracy profiling, stored profiles")
    sub = group.add_subparsers(dest="action", required=True)
    root = dict(type=Path, default=default_root(), help=f"profile directory root (default {default_root()}; "
                                                         "env SWAPMOE_PROFILES)")

    p = sub.add_parser("accuracy", help="score random configurations on Ray and fit E_accuracy")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--set", choices=["lm", "summarization"],
                   help="profiling set (default: lm for decoder-only models, summarization for encoder-decoder)")
    p.add_argument("--configurations", type=int, default=64, help="random configurations to score (default 64)")
    p.add_argument("--texts", type=int, default=3, help="profiling texts per domain (lm; default 3)")
    p.add_argument("--tokens", type=int, default=256, help="tokens per text (lm; default 256)")
    p.add_argument("--pairs", type=int, default=32, help="code/summary pairs (summarization; default 32)")
    p.add_argument("--seed", type=int, default=0, help="configurations are a function of the seed (default 0)")
    p.add_argument("--workers", type=int, default=0, help="Ray actors, one runtime each (default: one per CPU)")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--max-resident", metavar="MEM", type=size, default=0,
                   help="expert bytes one actor may hold, e.g. 4GiB, so that actors of a large model fit in memory "
                        "beside each other: configurations over it are not scored (no device budget of interest "
                        "would choose them) and the full model is scored exactly on demand within it "
                        "(default: no cap)")
    p.add_argument("--root", **root)
    p.set_defaults(func=accuracy)

    p = sub.add_parser("device", help="profile an executor's device (directly or through its planner)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--executor", type=address_type(EXECUTOR_PORT),
                       help=f"executor address, HOST[:PORT] (default port {EXECUTOR_PORT})")
    where.add_argument("--planner", type=address_type(PLANNER_PORT),
                       help=f"planner address, HOST[:PORT] (default port {PLANNER_PORT}), for an executor that dials "
                            "out to it (with --node-id)")
    p.add_argument("--node-id", help="the executor's node id at the planner")
    p.add_argument("--repeats", type=int, default=5, help="repetitions per measurement (default 5)")
    p.add_argument("--sweep-tokens", type=int, default=48, help="tokens generated per update frequency (default 48)")
    p.add_argument("--root", **root)
    p.set_defaults(func=device)

    p = sub.add_parser("show", help="print a stored profile; --plots writes PNGs")
    p.add_argument("directory", help="an accuracy or device profile directory")
    p.add_argument("--plots", metavar="DIR", help="write plots (PNG) into DIR")
    p.set_defaults(func=show)
