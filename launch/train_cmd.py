"""``idforge train``: LightningCLI over :class:`IdentityDiffusionModule` and :class:`ShardDataModule`.

    idforge train fit --config configs/train/tiny.yaml [--trainer.max_steps 100 ...]

Every YAML under ``configs/train/`` maps 1:1 to the two classes' constructor arguments. The parser
raises :class:`~idforge.launch.errors.UsageError` instead of exiting, so a bad key or value is
reported like every other command's (one line naming the key and the file, exit code 2).
"""

from __future__ import annotations

from idforge.train.data import ShardDataModule
from idforge.train.module import IdentityDiffusionModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .errors import RaisingParserMixin
from .train_extras import check_train_extras


class TrainParser(RaisingParserMixin, LightningArgumentParser):
    """LightningCLI's parser, reporting errors through the ``idforge`` command's one-line format."""


class TrainCLI(LightningCLI):
    """LightningCLI that checks optional extras (DeepSpeed, wandb) before building anything."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_train_extras(config.get("trainer"))


def run_train(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return TrainCLI(
        IdentityDiffusionModule,
        ShardDataModule,
        args=args,
        run=run,
        parser_class=TrainParser,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "idforge train"},
    )


class _ParseOnlyCLI(TrainCLI):
    """Parses and validates a configuration without building models (no weights are loaded)."""

    def instantiate_classes(self) -> None:
        return None


def parse_train_config(args: list[str]):
    """Validate training arguments/YAML against the constructors; returns the parsed namespace."""
    cli = _ParseOnlyCLI(
        IdentityDiffusionModule,
        ShardDataModule,
        args=args,
        run=False,
        parser_class=TrainParser,
        parser_kwargs={"prog": "idforge train"},
    )
    return cli.config
