"""``--plot``: remote GB/s against tokens per rank, one column per shape, dispatch above combine.

The y axis is logarithmic, with the limit measured in the same run drawn as a line and a right-hand
axis in % of it: on CPU every backend sits at well under 1 % of the memory-copy limit, and on GPU
the backends span an order of magnitude, so a linear axis up to the limit would flatten them.
matplotlib is optional (the ``[plot]`` extra) and imported only here.
"""
from __future__ import annotations

__all__ = ["PLOT_INSTALL_HINT", "matplotlib_available", "plot"]

PLOT_INSTALL_HINT = 'install the [plot] extra: pip install -e ".[plot]" (or pip install matplotlib)'


def matplotlib_available() -> bool:
    """Whether matplotlib imports (checked before the run, so ``--plot`` never fails after it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot(result: dict, path: str) -> None:
    """Write the PNG at ``path`` from a bench result whose rows carry ``gbps_dispatch`` /
    ``gbps_combine`` (see ``runner.add_rates``). Rows with 0 tokens or 0 remote bytes have no
    rate and are left out.

    Raises:
        ImportError: matplotlib is not installed (with the install hint).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        raise ImportError(f"--plot needs matplotlib: {PLOT_INSTALL_HINT} ({exc})") from exc

    limit, limit_name = result["limit_gbps"], result["limit_name"]
    rows = [r for r in result["rows"] if r["tokens"] > 0 and r["gbps_dispatch"] > 0 and r["gbps_combine"] > 0]
    shapes = sorted({(r["experts"], r["topk"], r["hidden"]) for r in rows}) or [None]
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    colors = {name: f"C{i}" for i, name in enumerate(backends)}
    fig, axes = plt.subplots(2, len(shapes), figsize=(5.5 * len(shapes), 7), squeeze=False, sharex="col")
    for col, shape in enumerate(shapes):
        for row, (op, key) in enumerate((("dispatch", "gbps_dispatch"), ("combine", "gbps_combine"))):
            ax = axes[row][col]
            for name in backends:
                rs = sorted((r for r in rows if (r["backend"], r["experts"], r["topk"], r["hidden"]) == (name, *shape)),
                            key=lambda r: r["tokens"])
                if rs:
                    ax.plot([r["tokens"] for r in rs], [r[key] for r in rs], marker="o", color=colors[name], label=name)
            if limit > 0:
                ax.axhline(limit, color="k", lw=1, ls="--", label=f"{limit_name} {limit:.0f} GB/s")
                pct = ax.secondary_yaxis("right", functions=(lambda g: 100 * g / limit, lambda p: p * limit / 100))
                pct.set_ylabel(f"% of {limit_name}")
            title = f"{op}: H={shape[2]}, top-{shape[1]} of {shape[0]}" if shape else f"{op}: no rows with a rate"
            ax.set(xscale="log", yscale="log", ylabel="remote GB/s", title=title)
            tokens = sorted({r["tokens"] for r in rows})
            ax.set_xticks(tokens, [str(t) for t in tokens])  # the measured sizes, not 3×10² labels
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
            if row == 1:
                ax.set_xlabel("tokens per rank")
            ax.legend(fontsize=7, loc="best")
    where = "CPU" if result["device"] == "cpu" else result["device"]
    fig.suptitle(f"moe_dispatch bench: {result.get('nproc', '?')} ranks on {where}, {result['dtype']}, "
                 f"torch {result['torch']} (log scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
