"""How the ``idforge`` command reports what went wrong: one line that names the file, key or path.

Two kinds of failure, two exit codes:

- :class:`UsageError` (exit 2): the command line or a ``--config`` file cannot be accepted (unknown
  key, wrong type, missing required option). Parsers raise it instead of printing usage and exiting
  (:class:`RaisingParserMixin`), so every command reports it the same way.
- anything else raised while the command runs (exit 1): a missing file, an unreadable model folder.

:func:`usage_message` turns jsonargparse's messages, some of which span several lines and none of
which name the config file an unknown key came from, into one sentence with what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

USAGE_EXIT = 2
FAILURE_EXIT = 1


class UsageError(Exception):
    """The command line or a configuration file cannot be accepted (exit code 2)."""


class RaisingParserMixin:
    """Mix into a jsonargparse parser: errors raise :class:`UsageError` instead of printing usage and
    exiting, so the caller formats them as one line and picks the exit code."""

    def error(self, message: str, ex: Exception | None = None):
        raise UsageError(message) from ex


def one_line(text: str, limit: int = 400) -> str:
    """Collapse a (possibly multi-line) message onto one line, cut at ``limit`` characters."""
    flat = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _config_files(argv: list[str]) -> list[Path]:
    """The files given with ``--config`` / ``-c`` (both ``--config F`` and ``--config=F``)."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def _has_key(tree, dotted: str) -> bool:
    """Whether a parsed YAML mapping holds the dotted key (``data.batch_sizee``)."""
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _file_with_key(argv: list[str], key: str) -> Path | None:
    for path in reversed(_config_files(argv)):  # later files override earlier ones
        try:
            tree = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if _has_key(tree, key):
            return path
    return None


_UNKNOWN_KEY = re.compile(
    r"(?:Group '(?P<group>[\w.]+)' )?does not accept option '(?P<key>[^']+)'"
    r"|Option '(?P<opt>[^']+)' is not accepted|No action for key \"?(?P<action>[\w.]+)\"?"
)
_BAD_VALUE = re.compile(r'Parser key "([^"]+)":(.*)', re.DOTALL)
_GIVEN = re.compile(r"(?:Given value|Got value):\s*(.+)")


def usage_message(message: str, argv: list[str], command: str) -> str:
    """One sentence for a parser error: which file or option, what is wrong, what to do."""
    unknown = _UNKNOWN_KEY.search(message)
    if unknown:
        key = unknown["key"] or unknown["opt"] or unknown["action"]
        if unknown["group"] and not key.startswith(unknown["group"] + "."):
            key = f"{unknown['group']}.{key}"
        source = _file_with_key(argv, key)
        where = f"{source}: unknown key '{key}'" if source else f"unknown option --{key}"
        return f"{where} for `{command}`; run `{command} --print_config` to list the valid keys"
    bad = _BAD_VALUE.match(message.strip())
    if bad:
        key, rest = bad.group(1), bad.group(2)
        if key == "config":
            return f"--config: {one_line(rest)}"
        given = _GIVEN.search(rest)
        value = f" {given.group(1).strip()!r}" if given else ""
        source = _file_with_key(argv, key)
        origin = f"{source}: " if source else ""
        expected = re.search(r"Expected a <class '(\w+)'>", rest)
        want = f" (expected {expected.group(1)})" if expected else ""
        return f"{origin}invalid value{value} for '{key}'{want}; see `{command} --help`"
    if message.startswith("unrecognized arguments:"):
        return f"{message}; see `{command} --help`"
    return f"{one_line(message)}; see `{command} --help`"
