"""`hf-speft plot`: per-layer x per-module density heatmap and |values| histogram of a saved adapter."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Optional

from .common import ADAPTER_DIR_HELP, CliError

if TYPE_CHECKING:
    from hf_speft.hub import AdapterSummary


def density_grid(summary: AdapterSummary) -> tuple[list[int], list[str], list[list[Optional[float]]]]:
    """(layers, module kinds, density per layer x kind) of an adapter; layer -1 holds modules outside numbered
    blocks, None marks a kind a layer does not adapt."""
    layers: dict[int, dict[str, float]] = {}
    kinds: list[str] = []
    for module in summary.modules:
        match = re.search(r"\.(\d+)\.", f".{module.name}.")
        layer = int(match.group(1)) if match else -1
        kind = module.name.rsplit(".", 1)[-1]
        layers.setdefault(layer, {})[kind] = module.density
        if kind not in kinds:
            kinds.append(kind)
    order = sorted(layers)
    return order, kinds, [[layers[layer].get(kind) for kind in kinds] for layer in order]


def run(args: argparse.Namespace) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("plot needs matplotlib: pip install 'hf-speft[plot]'.") from None
    import numpy as np

    from hf_speft.hub import read_adapter_folder, summarize_adapter

    folder = read_adapter_folder(args.adapter_dir)
    summary = summarize_adapter(args.adapter_dir, folder)
    order, kinds, rows = density_grid(summary)
    grid = np.array([[np.nan if density is None else density for density in row] for row in rows], dtype=float)
    values = np.concatenate([t.float().abs().numpy() for k, t in folder.tensors.items() if k.endswith(".speft_values")])

    figure, (heat, hist) = plt.subplots(1, 2, figsize=(12, max(3, 0.35 * len(order) + 2)))
    image = heat.imshow(grid, aspect="auto", cmap="viridis")
    heat.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    heat.set_yticks(range(len(order)), [str(layer) if layer >= 0 else "-" for layer in order])
    heat.set_xlabel("module")
    heat.set_ylabel("layer")
    heat.set_title(f"mask density ({summary.config.get('salience')}, {summary.config.get('mask_scope')})")
    figure.colorbar(image, ax=heat)
    hist.hist(values, bins=50, log=True)
    hist.set_xlabel("|value|")
    hist.set_ylabel("entries")
    hist.set_title(f"trained values ({summary.nnz:,} entries)")
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def add_parser(commands: argparse._SubParsersAction) -> None:
    plot = commands.add_parser("plot", help="per-layer x per-module density heatmap and |values| histogram",
                               epilog="example: hf-speft plot out/adapter --out mask.png")
    plot.add_argument("adapter_dir", help=ADAPTER_DIR_HELP)
    plot.add_argument("--out", default="mask.png", help="image to write, relative to the current folder (the "
                      "extension picks the format: .png, .pdf, .svg)")
    plot.set_defaults(run=run)
