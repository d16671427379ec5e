"""`hf-speft compose`: a new adapter composed exactly from saved SPEFT adapters (`hf_speft.compose`), file to file."""

from __future__ import annotations

import argparse

from .common import CliError, library_constant, speft_deltas, staged_folder


def run(args: argparse.Namespace) -> None:
    from hf_speft.checkpoint import ModuleDelta, write_weights
    from hf_speft.compose import check_combination, compose_modules, composed_config
    from hf_speft.config import SparsePeftConfig
    from hf_speft.hub import update_model_card

    weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
    check_combination(len(args.adapters), weights, args.combination, args.density, args.majority_sign_method)
    read = [speft_deltas(path, "compose in Python with model.add_weighted_adapter") for path in args.adapters]
    (first_config, first), first_path = read[0], args.adapters[0]
    for path, (config, deltas) in zip(args.adapters, read):
        if config.get("lora_r"):
            raise CliError(f"{path!r} is a hybrid adapter (lora_r={config['lora_r']}): its low-rank part has no exact "
                           "sparse composition; compose sparse-only adapters.")
        bases = {first_config.get("base_model_name_or_path"), config.get("base_model_name_or_path")} - {None}
        if len(bases) > 1:
            raise CliError(f"{first_path!r} and {path!r} were trained on different base models {sorted(bases)}.")
        shapes = {name: delta.shape for name, delta in deltas.items()}
        if shapes != {name: delta.shape for name, delta in first.items()}:
            different = sorted(set(shapes).symmetric_difference(first) or
                               {name for name in shapes if shapes[name] != first[name].shape})
            raise CliError(f"{first_path!r} and {path!r} adapt different modules or shapes (e.g. {different[:3]}); "
                           "only adapters on the same targets of the same base compose.")
    composed = compose_modules({name: [deltas[name].all_entries() for _, deltas in read] for name in first}, weights,
                               args.combination, args.density, args.majority_sign_method, args.budget, args.seed)
    config = composed_config(SparsePeftConfig.from_pretrained(first_path), composed)
    values_dtype = next(iter(first.values())).values.dtype
    with staged_folder(args.out) as staging:
        write_weights(staging, {name: ModuleDelta(first[name].shape, indices, values)
                                for name, (indices, values) in composed.items()}, values_dtype)
        config.save_pretrained(staging)
        update_model_card(staging)
    print(f"composed {len(args.adapters)} adapters ({args.combination}) into {args.out}: {config.num_params:,} entries")


def add_parser(commands: argparse._SubParsersAction) -> None:
    compose = commands.add_parser(
        "compose", help="compose saved adapters exactly: weighted sum, TIES, DARE or magnitude pruning",
        epilog="example: hf-speft compose out/math out/code --weights 0.7 0.3 --combination ties --density 0.5 "
               "--out out/both")
    compose.add_argument("adapters", nargs="+", help="SPEFT adapter folders of the same base and targets")
    compose.add_argument("--weights", nargs="+", type=float, help="one per adapter (default: 1 each)")
    compose.add_argument("--combination", choices=library_constant("compose", "COMBINATION_TYPES"),
                         default="linear", help="how the deltas combine")
    compose.add_argument("--density", type=float, help="fraction of each adapter's entries kept (ties, dare_*, "
                         "magnitude_prune)")
    compose.add_argument("--majority_sign_method", default="total",
                         choices=library_constant("compose", "MAJORITY_SIGN_METHODS"),
                         help="how TIES elects each entry's sign")
    compose.add_argument("--budget", type=int, help="keep only this many entries, the largest |values|")
    compose.add_argument("--seed", type=int, default=0, help="seed of DARE's random pruning")
    compose.add_argument("--out", required=True, help="folder for the composed adapter")
    compose.set_defaults(run=run)
