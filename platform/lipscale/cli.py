"""The `lipscale` command.

    lipscale run | resume | status SPEC     a study (lipscale.study)
    lipscale fit | report SPEC              its scaling laws and report (lipscale.report)
    lipscale plan PRESET --batch B          what a train step costs (lipscale.plan)
    lipscale rehearse SPEC                  a cluster study run on this machine first (lipscale.rehearse)
    lipscale data convert NAME ...          datasets in the shard format (lipscale.data.convert)

Every command's arguments are declared here, and only the chosen command's;
what runs it (torch, Ray, MLflow: seconds to import) is imported once its
arguments have parsed. `lipscale --help` and `lipscale data convert --help`
import none of them.
"""

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    help: str
    declare: Callable[[argparse.ArgumentParser], None]
    """Adds the command's arguments, and sets `run`: "module:function" of its implementation."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    module, _, function = args.run.partition(":")
    return getattr(importlib.import_module(module), function)(args) or 0


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Every command, with the arguments of `chosen` (a command's name) only."""
    parser = argparse.ArgumentParser(prog="lipscale", description="LipScale: scaling studies of LipNeXt.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = commands.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            command.declare(p)
    return parser


# --- studies ----------------------------------------------------------------------------------


def study_options(parser: argparse.ArgumentParser) -> None:
    """What every study command takes besides its spec (studies/scaling_law.py too)."""
    parser.add_argument("--root", help="study root (path or s3:// URI) in place of the spec's storage.root")
    parser.add_argument("--smoke-test", action="store_true", help="two one-epoch trials of the spec, as <name>-smoke")


def _study(run: str, **defaults) -> Callable[[argparse.ArgumentParser], None]:
    def declare(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("spec", metavar="SPEC", help="study spec (YAML)")
        study_options(parser)
        parser.set_defaults(run=run, **defaults)

    return declare


def entry_parser(default_spec: str | None, doc: str | None) -> argparse.ArgumentParser:
    """studies/scaling_law.py's command line: `lipscale run` with the spec as an option, or
    `lipscale rehearse` with --rehearse."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=default_spec, help=f"study spec (YAML); default {default_spec}")
    parser.add_argument("--resume", action="store_true", help="continue the study; refuses a changed search space")
    study_options(parser)
    parser.add_argument("--rehearse", action="store_true", help="rehearse the study on this machine (lipscale rehearse)")
    rehearse_options(parser)
    return parser


def rehearse_options(parser: argparse.ArgumentParser) -> None:
    from lipscale.rehearse import CLUSTER_CONFIG  # a rehearsal imports torch, Optuna and MLflow anyway

    parser.add_argument("--cluster", default=CLUSTER_CONFIG, help=f"Ray cluster launcher config (default {CLUSTER_CONFIG})")
    parser.add_argument("--real-stores", action="store_true",
                        help="rehearse on the spec's own stores, under <root>-rehearsal/ (default: local ones)")
    parser.add_argument("--flops-per-s", type=float, help="sustained FLOP/s of one GPU (default 4e14, an H100's 40%%)")


def _rehearse(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="study spec (YAML)")
    parser.add_argument("--root", help="where the rehearsals go (default runs/<name>-rehearsal/<time>)")
    rehearse_options(parser)
    parser.set_defaults(run="lipscale.rehearse:rehearse_command")


def _report(parser: argparse.ArgumentParser) -> None:
    from lipscale.scaling import LINKS  # the fit imports numpy and scipy anyway

    parser.add_argument("spec", metavar="SPEC", help="study spec (YAML)")
    parser.add_argument("--root", help="study root (path or s3:// URI) in place of the spec's storage.root")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples per fit (default 200)")
    parser.add_argument("--level", type=float, default=0.9, help="interval level (default 0.9)")
    parser.add_argument("--link", choices=LINKS, default=LINKS[0],
                        help="'logit': the odds err / (1 - err) follow the law, for errors near 1 (default log)")
    parser.add_argument("--shared-exponent", action="store_true",
                        help="fit the laws of 1 - CRA at every eps together, one exponent shared")
    parser.set_defaults(run="lipscale.report.command:report_command")


def _report_files(parser: argparse.ArgumentParser) -> None:
    _report(parser)
    parser.add_argument("--out", help="directory of the files (default <root>/report)")


# --- the planner ------------------------------------------------------------------------------


def _plan(parser: argparse.ArgumentParser) -> None:
    from lipnext.config import PRESETS  # `lipscale plan` imports torch anyway: lipnext's package does
    from typing import get_args

    from lipnext.train_config import ActivationCheckpointing
    from lipscale.plan import DTYPE_BYTES

    parser.add_argument(
        "preset", metavar="PRESET", nargs="?", choices=list(PRESETS), help=f"one of: {', '.join(PRESETS)}"
    )
    parser.add_argument("--spec", help="a study spec: plan its largest trial and print its GPU-hours")
    parser.add_argument("--world-size", type=int, default=1, help="ranks sharding the model with FSDP2 (default 1)")
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), default="fp32", help="compute dtype (default fp32)")
    parser.add_argument("--batch", type=int, help="global batch, as the spec's data.batch_size (with PRESET)")
    parser.add_argument("--micro-batch", type=int, help="samples per rank per forward/backward (default: the per-rank batch)")
    parser.add_argument(
        "--activation-checkpointing", choices=get_args(ActivationCheckpointing), help="default none, or as --gpu-memory-gib needs"
    )
    parser.add_argument(
        "--gpu-memory-gib", type=float,
        help="memory per GPU: choose the largest micro-batch that fits (and checkpointing if it needs it)",
    )  # fmt: skip
    parser.add_argument(
        "--flops-per-s", type=float,
        help="sustained FLOP/s of one rank (default: measured here with a matmul; with --spec 4e14, an H100's 40%%)",
    )  # fmt: skip
    parser.set_defaults(run="lipscale.cost:plan_command")


# --- datasets ---------------------------------------------------------------------------------


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _data(parser: argparse.ArgumentParser) -> None:
    from lipscale.data.catalog import CIFAR, CLASS_FOLDERS
    from lipscale.data.shapes import ShapesConfig

    commands = parser.add_subparsers(dest="data_command", required=True)
    convert = commands.add_parser(
        "convert", help="convert a dataset to Parquet shards", description="Converters to the LipScale shard format."
    )
    names = convert.add_subparsers(dest="name", required=True, metavar="NAME")

    def dataset(name: str, help: str, source: bool) -> argparse.ArgumentParser:
        p = names.add_parser(name, help=help)
        if source:
            p.add_argument("source", metavar="SOURCE", help="archive or folder: a path or fsspec URI")
        p.add_argument("dest", metavar="DEST", help="dataset root: a path, file:// or s3:// URI")
        p.add_argument("--shard-size", type=_positive, help="samples per shard")
        p.add_argument("--workers", type=_positive, default=1, help="processes writing shards")
        p.set_defaults(run="lipscale.data.convert:convert_command", options=())
        return p

    dataset("digits", "scikit-learn's bundled 8x8 digits (offline default)", source=False)
    shapes = dataset("shapes", "procedurally generated 32x32 shapes and textures", source=False)
    defaults = ShapesConfig()
    shapes.add_argument("--train", type=int, default=defaults.train, help="train samples")
    shapes.add_argument("--test", type=int, default=defaults.test, help="test samples")
    shapes.add_argument("--num-classes", type=int, default=defaults.num_classes, help="classes (2..15)")
    shapes.add_argument("--seed", type=int, default=defaults.seed, help="generator seed")
    shapes.set_defaults(options=("train", "test", "num_classes", "seed"))
    for name in CIFAR:
        dataset(name, f"{name} from the official python tarball", source=True)
    for name, (size, encoding, _) in CLASS_FOLDERS.items():
        p = dataset(name, f"{name} from class folders (folder, .zip or .tar)", source=True)
        p.add_argument("--size", type=int, default=size, help="image side after resize and centre crop")
        p.add_argument("--encoding", choices=("raw", "png"), default=encoding, help="how images are stored")
        p.add_argument("--seed", type=int, default=0, help="seed of the shuffled write order")
        p.add_argument("--classes", type=_positive, help="keep this many classes (LiResNet's seeded draw)")
        p.add_argument("--class-seed", type=int, default=2023, help="seed of the class draw (2023: the paper's)")
        p.set_defaults(options=("size", "encoding", "seed", "classes", "class_seed"))


COMMANDS = {
    "run": Command("run a study (continues it when it exists)", _study("lipscale.study:run_command", resume=False)),
    "resume": Command("continue a study; refuses a spec that changed anything its results depend on",
                      _study("lipscale.study:run_command", resume=True)),
    "status": Command("the trials of a study, from its Optuna storage", _study("lipscale.study:status_command")),
    "fit": Command("fit scaling laws of a study's envelope: intervals, the leave-the-largest-out verdict and the "
                   "1B/2B extrapolation", _report),
    "report": Command("the fits, plus plots (PNG and one HTML page) logged to the study's MLflow parent run",
                      _report_files),
    "plan": Command("FLOPs, per-rank memory and step time of a preset's train step", _plan),
    "rehearse": Command("run a cluster study's trials on this machine, shrunk, on a local Ray cluster of its node "
                        "types: a checklist and the study's GPU-hours", _rehearse),
    "data": Command("datasets in the LipScale shard format", _data),
}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
