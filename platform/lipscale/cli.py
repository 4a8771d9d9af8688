"""The `lipscale` command. Each subcommand lives in the module that does the
work and registers itself here through `add_parser(subparsers)`."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipscale", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in _subcommand_modules():
        module.add_parser(subparsers)
    return parser


def _subcommand_modules() -> list:
    from lipscale import plan, report, study
    from lipscale.data import convert

    return [convert, plan, report, study]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
