"""The ``idforge`` command: one entry point, a subcommand per job, every one built the same way.

    idforge demo             whole flow on SynthID + tiny models (CPU, offline)
    idforge curate           raw photos -> identity-grouped webdataset shards
    idforge curate-finalize  the single finalizer of a multi-worker curation
    idforge caption-finetune BLIP fine-tuned on attribute captions (Diff-ID's captioner)
    idforge cache            shards + cached VAE latents and CLIP text states
    idforge train            LightningCLI (fit / validate / test)
    idforge export           Lightning checkpoint -> self-contained model folder
    idforge generate         images of a reference face's identity
    idforge eval             held-out FS table of an exported model
    idforge convert-onnx     insightface recognition .onnx -> torch face-encoder folder

Each subcommand is a jsonargparse parser over a typed function (or, for ``curate``, the
``CurateConfig`` dataclass; for ``train``, LightningCLI), the way LightningCLI and litgpt build
theirs: ``--config FILE`` (YAML keys = the options), ``--print_config``, typed options whose help is
the function's docstring. ``~`` and environment variables are expanded in path options. Errors are
one line on stderr naming the file, key or path (:mod:`.errors`); exit code 2 for usage errors, 1 for
failures; ``--debug`` (anywhere on the line) shows the traceback, ``-v`` the libraries' logs.

Only this package prints; library code logs.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import os
import sys
import traceback
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from idforge.paths import expand_path

from .errors import FAILURE_EXIT, USAGE_EXIT, UsageError, one_line, usage_message


@dataclass(frozen=True)
class Command:
    """A subcommand: ``target`` is ``module:function`` (options = the function's parameters) or, with
    ``config_class``, the options are that dataclass's fields and ``target`` receives the instance."""

    target: str
    help: str
    config_class: str | None = None
    uses_models: bool = True
    """Whether it loads Lightning / diffusers / transformers models: their logs and per-load bars are
    quieted up front (importing them costs seconds, so commands that do not need them skip it)."""


COMMANDS: dict[str, Command] = {
    "demo": Command("idforge.launch.demo_cmd:demo", "run the end-to-end demo on SynthID with tiny models"),
    "curate": Command(
        "idforge.launch.curate_cmd:curate",
        "curate raw photos into identity-grouped webdataset shards",
        config_class="idforge.data_pipeline.job:CurateConfig",
        uses_models=False,
    ),
    "curate-finalize": Command(
        "idforge.launch.curate_cmd:finalize",
        "write the shards of a multi-worker curation once every unit is done",
        config_class="idforge.data_pipeline.job:CurateConfig",
        uses_models=False,
    ),
    "caption-finetune": Command(
        "idforge.launch.caption_finetune_cmd:caption_finetune",
        "fine-tune BLIP on attribute captions (Diff-ID's captioner)",
    ),
    "cache": Command(
        "idforge.launch.cache_cmd:cache", "add cached VAE latents and CLIP text states to curated shards"
    ),
    "train": Command("idforge.launch.train_cmd:run_train", "LightningCLI: idforge train fit --config YAML"),
    "export": Command(
        "idforge.launch.export_cmd:export", "export a training checkpoint to a self-contained model folder"
    ),
    "generate": Command(
        "idforge.launch.generate_cmd:generate", "generate images of a reference face's identity"
    ),
    "eval": Command(
        "idforge.launch.eval_cmd:evaluate",
        "score a model or an image folder with a protocol (diffid, flashface)",
    ),
    "morph": Command("idforge.launch.morph_cmd:morph", "frames morphing one person into another"),
    "edit": Command(
        "idforge.launch.edit_cmd:edit", "edit a photo: fine-tune, invert, attention mask, masked denoising"
    ),
    "convert-onnx": Command(
        "idforge.launch.convert_cmd:convert_onnx",
        "convert an insightface recognition .onnx into a torch face-encoder folder",
        uses_models=False,
    ),
}
"""Subcommands in the order ``idforge --help`` lists them; modules are imported only when used."""


def _resolve(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    rows = "\n".join(f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items())
    return (
        "usage: idforge [--debug] [-v] COMMAND [--config FILE] [--print_config] [options]\n\n"
        "Train zero-shot identity-conditioned face generators and curate their data.\n\n"
        f"commands:\n{rows}\n\n"
        "`idforge COMMAND --help` lists a command's options; every command takes --config FILE (YAML\n"
        "whose keys are the options) and --print_config. --debug shows tracebacks, -v library logs."
    )


# -- parsers -----------------------------------------------------------------------------------


def _parser(prog: str, description: str):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from .errors import RaisingParserMixin

    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    class CommandParser(RaisingParserMixin, ArgumentParser):
        pass

    p = CommandParser(prog=prog, description=description, allow_abbrev=False)
    p.add_argument(
        "-c", "--config", action=ActionConfigFile, help="YAML file whose keys are this command's options"
    )
    return p


def _is_bool(annotation) -> bool:
    return annotation is bool or annotation == "bool"


def _is_list(annotation) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_list(a) for a in typing.get_args(annotation))
    return origin is list


def _mentions_path(annotation) -> bool:
    return annotation is Path or any(_mentions_path(a) for a in typing.get_args(annotation))


def _hints(fn) -> dict:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001  (unresolvable forward references: treat every option as plain)
        return {}


def _shell_style(argv: list[str], hints: dict) -> list[str]:
    """Accept the shell habits jsonargparse does not: a bare ``--flag`` for a bool option (``--quick``)
    and a repeated ``--prompt A --prompt B`` for a list option (appended, as ``--prompt+``)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:] if arg.startswith("--") and "=" not in arg else None
        hint = hints.get(name) if name else None
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if hint is not None and _is_bool(hint) and (nxt is None or nxt.startswith("-")):
            out.append(f"{arg}=true")
        elif hint is not None and _is_list(hint) and nxt is not None and not nxt.lstrip().startswith("["):
            out += [f"{arg}+", nxt]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def _run_function(prog: str, fn, argv: list[str]):
    doc = inspect.getdoc(fn) or ""
    p = _parser(prog, doc.split("\n\n")[0])
    p.add_function_arguments(fn, None, as_group=False)
    hints = _hints(fn)
    cfg = p.instantiate(p.parse_args(_shell_style(argv, hints)))
    kwargs = {}
    for name in inspect.signature(fn).parameters:
        if name in cfg:
            value = cfg[name]
            kwargs[name] = expand_path(value) if _mentions_path(hints.get(name, type(None))) else value
    return fn(**kwargs)


def _run_config(prog: str, config_class, fn, argv: list[str]):
    doc = inspect.getdoc(fn) or ""
    p = _parser(prog, doc.split("\n\n")[0])
    p.add_class_arguments(config_class, None)
    hints = _hints(config_class)
    cfg = p.instantiate(p.parse_args(_shell_style(argv, hints)))
    fields = {f.name: cfg[f.name] for f in dataclasses.fields(config_class) if f.name in cfg}
    return fn(config_class(**fields))


def run_command(name: str, argv: list[str]) -> int:
    cmd = COMMANDS[name]
    fn = _resolve(cmd.target)
    prog = f"idforge {name}"
    if name == "train":
        result = fn(argv)
    elif cmd.config_class:
        result = _run_config(prog, _resolve(cmd.config_class), fn, argv)
    else:
        result = _run_function(prog, fn, argv)
    return result if isinstance(result, int) else 0  # commands may return what they wrote


# -- logging and the libraries' output ----------------------------------------------------------


def _quiet_libraries() -> None:
    """Keep the command's output to idforge's own report and progress bars (``-v`` shows the libraries'
    logs). Download progress bars (huggingface_hub's) stay on: a first multi-GB download shows."""
    import warnings

    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: quiet them after it)
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-load "Loading weights" bars ...
    diffusers_logging.disable_progress_bar()
    enable_progress_bars()  # ... but transformers' switch also silences downloads: turn those back on
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")


def _pop_flags(argv: list[str], *flags: str) -> bool:
    found = any(f in argv for f in flags)
    argv[:] = [a for a in argv if a not in flags]
    return found


def _failure_message(exc: BaseException) -> str:
    text = one_line(str(exc))
    if isinstance(exc, (OSError, ValueError, RuntimeError)) and text and not isinstance(exc, KeyError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _pop_flags(argv, "--debug")
    verbose = _pop_flags(argv, "-v", "--verbose")
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help())
        return 0 if argv else USAGE_EXIT
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"idforge: error: unknown command '{name}'; choose from {', '.join(COMMANDS)} "
            "(idforge --help describes them)",
            file=sys.stderr,
        )
        return USAGE_EXIT
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
        if COMMANDS[name].uses_models:
            _quiet_libraries()
    try:
        return run_command(name, rest)
    except UsageError as exc:
        if debug:
            traceback.print_exc()
        prog = f"idforge {name}" + (
            f" {rest[0]}" if name == "train" and rest and not rest[0].startswith("-") else ""
        )
        print(f"idforge {name}: error: {usage_message(str(exc), rest, prog)}", file=sys.stderr)
        return USAGE_EXIT
    except KeyboardInterrupt:
        print(f"idforge {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (every failure ends as one line; --debug shows where)
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"idforge {name}: error: {_failure_message(exc)}{hint}", file=sys.stderr)
        return FAILURE_EXIT


if __name__ == "__main__":
    raise SystemExit(main())
