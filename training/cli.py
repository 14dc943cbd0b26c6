"""`idml-train`: train, evaluate and export IDML models.

    idml-train train --config configs/emoji.yaml [--set section.key=value ...]
    idml-train train --resume runs/emoji [--set schedule.epochs=40]
    torchrun --nproc_per_node 2 -m training.cli train --config configs/emoji.yaml
    idml-train evaluate runs/emoji/best.pt --split val --out metrics.json
    idml-train export ...   (see `idml-train export --help`)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from training.config import ConfigError, load_config, parse_override

logger = logging.getLogger(__name__)


def _train_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file; defaults apply to keys it leaves out")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML syntax), e.g. --set optim.lr=3e-4; repeatable",
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR_OR_CHECKPOINT",
        help="continue a run from its last.pt (or the given checkpoint) with the config stored there; "
             "--set still applies, e.g. schedule.epochs=40",
    )


def launched_rank() -> int:
    """Rank that torchrun gave this process (its RANK variable); 0 without torchrun."""
    text = os.environ.get("RANK", "0")
    return int(text) if text.isdigit() else 0


def _resume_path(text: str) -> Path:
    path = Path(text)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"--resume {text}: {path} does not exist")
    return path


def run_train(args: argparse.Namespace) -> int:
    from training.train import resume_config, train

    if args.resume:
        if args.config:
            raise ConfigError("--resume uses the config stored in the checkpoint; drop --config")
        checkpoint = _resume_path(args.resume)
        overrides: dict[str, dict] = {}
        for text in args.overrides:
            (section, key), value = parse_override(text)
            overrides.setdefault(section, {})[key] = value
        config = resume_config(checkpoint, overrides)
        result = train(config, resume_from=checkpoint)
    else:
        config = load_config(args.config, args.overrides)
        result = train(config)
    if launched_rank() == 0:
        print(json.dumps({"epoch": result["epoch"], "step": result["step"], "best": result["best"],
                          "run_dir": result["run_dir"]}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idml-train", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    commands = parser.add_subparsers(dest="command", required=True)
    _train_parser(commands.add_parser("train", help="train a model"))
    from training.evaluate import build_parser as evaluate_parser

    evaluate_parser(commands.add_parser("evaluate", help="evaluate a checkpoint on val or test"))
    commands.add_parser("export", help="export a checkpoint to a model bundle", add_help=False)
    commands.add_parser("calibrate", help="refit the confidence calibration of a bundle in place", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("export", "calibrate"):
        # These commands have their own parsers in training.export.
        from training import export

        return export.main(argv[1:]) if argv[0] == "export" else export.calibrate_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = launched_rank()
    # Under torchrun, rank 0 logs at --log-level and the other ranks log warnings and errors only.
    level = args.log_level.upper() if rank == 0 else "WARNING"
    prefix = f"rank {rank} " if rank else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
    try:
        if args.command == "train":
            return run_train(args)
        from training.evaluate import run as run_evaluate

        result = run_evaluate(args)
        print(json.dumps(result, indent=2))
        return 0
    except (ConfigError, FileNotFoundError, ValueError) as error:
        logger.error("%s", error)
        print(f"idml-train {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
