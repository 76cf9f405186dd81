"""The command line of every Hydra entry point (`python -m sae_dist.train`, `sae-evaluate`, ...).

`run_hydra(config_name, schema, run)` is each module's `main()`: it composes
`<CONF_DIR>/<config_name>.yaml` with Hydra (overrides, `-m` multirun, `--cfg job`, `--hydra-help`
as `hydra.main` has them), turns the result into the typed `schema` dataclass and calls `run` on
it. On top of Hydra it refuses `+key=value` overrides that add a key the schema lacks, answers
`--help` with every key's type, value and docstring, and reports a `UserError` as one line,
`error: <message>`, with exit code 2 and no traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import os
import sys
import textwrap
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from sae_dist.config import register_configs
from sae_dist.errors import UserError


def _conf_dir() -> Path:
    """The packaged configs (`sae_dist/conf` in an installed wheel), else the checkout's conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else packaged.parents[1] / "conf"


CONF_DIR = _conf_dir()
"""The Hydra config directory: `sae_dist/conf` in a wheel, `<repo>/conf` in a source checkout or
editable install."""
RANK_OVERRIDES = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
"""Appended on processes of rank > 0: only the first process writes Hydra's files into out_dir."""


def fail(message: str) -> NoReturn:
    """Print `error: <message>` to stderr and exit with code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_hydra(config_name: str, schema: type, run: Callable[[Any], Any]) -> None:
    """Compose `config_name` from the command line, then `run(<schema instance>)`."""
    register_configs()
    args = sys.argv[1:]
    try:
        if {"-h", "--help"} & set(args):
            print(help_text(config_name, schema, run, _overrides(args)))
            return
        check_added_keys(_overrides(args), schema)
    except UserError as e:
        fail(str(e))
    added = RANK_OVERRIDES if int(os.environ.get("RANK", "0")) > 0 else []
    if not any(a.startswith("hydra.job.name=") for a in args):
        added = [*added, f"hydra.job.name={command_package(run).rsplit('.', 1)[-1]}"]
    at = _first_override(sys.argv)
    sys.argv[at:at] = added
    hydra.main(version_base=None, config_path=str(CONF_DIR), config_name=config_name)(_job(run))()


def _first_override(argv: list[str]) -> int:
    """Where in `argv` the command's own overrides go: beside the user's first override (argparse
    takes the overrides as one run of positional arguments, so none may follow an option such as
    `--cfg job` when others precede it), else at the end."""
    for i, arg in enumerate(argv[1:], start=1):
        if "=" in arg and not arg.startswith("-"):
            return i
    return len(argv)


def _job(run: Callable[[Any], Any]) -> Callable[[DictConfig], None]:
    """The Hydra task: typed config, `run`, user errors as one line."""

    @functools.wraps(run)
    def job(dcfg: DictConfig) -> None:
        try:
            run(typed_config(dcfg))
        except UserError as e:
            fail(str(e))

    return job


def typed_config(dcfg: DictConfig) -> Any:
    """The schema dataclass of a composed config; in multirun each job writes to its own Hydra
    job directory (`out_dir` = the job's output dir)."""
    cfg: Any = OmegaConf.to_object(dcfg)  # an instance of the schema dataclass
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        cfg.out_dir = HydraConfig.get().runtime.output_dir
    return cfg


def command_package(run: Callable[[Any], Any]) -> str:
    """The package whose `python -m` runs `run` (`sae_dist.train` for sae_dist.train.loop.train);
    `run_hydra` names the Hydra job (and so its log file) after its last part."""
    return run.__module__.rsplit(".", 1)[0]


def _overrides(args: list[str]) -> list[str]:
    """The `key=value` / `group=option` arguments of a command line (not its flags)."""
    return [a for a in args if not a.startswith("-") and "=" in a]


# ----------------------------------------------------------------------------- unknown keys


def check_added_keys(overrides: list[str], schema: type) -> None:
    """Hydra adds `+key=v` / `++key=v` even inside a structured (schema) node, where `key=v`
    fails; refuse an added key the schema does not have. Groups and `hydra.*` pass."""
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if (
            not (override.is_add() or override.is_force_add())
            or key.split(".")[0] == "hydra"
            or "/" in key
            or (CONF_DIR / key).is_dir()
        ):
            continue
        missing = _missing_key(schema, key.split("."))
        if missing:
            raise UserError(f"{key} does not exist: {missing}")


def _missing_key(schema: type, parts: list[str]) -> str | None:
    """What the schema lacks of a dotted key (e.g. "`train` has no key 'foo' (its keys: ...)");
    None when the key exists or leads into a free-form (non-dataclass) field."""
    cls: type | None = schema
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            parent = f"`{'.'.join(parts[:i])}`" if i else "the config"
            return f"{parent} has no key '{part}' (its keys: {', '.join(names)})"
        cls = _dataclass_in(typing.get_type_hints(cls)[part])
        if cls is None:
            return None
    return None


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type hint holds (`X` or `Optional[X]`), else None."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


# ----------------------------------------------------------------------------------- --help


def help_text(
    config_name: str, schema: type, run: Callable[[Any], Any], overrides: list[str]
) -> str:
    """Usage, config groups with their options, and every key of the schema with its type,
    value (after `overrides`) and docstring."""
    cfg, choices = _compose(config_name, overrides)
    command = f"python -m {command_package(run)}"
    lines = [
        f"usage: {command} [--help] [--hydra-help] [--cfg job] [-m] [group=option ...] "
        "[key=value ...]",
        "",
        f"config groups of {CONF_DIR / config_name}.yaml (group=option; * = chosen):",
    ]
    for group, chosen in sorted(choices.items()):
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"  {group}: " + ", ".join(o + "*" * (o == chosen) for o in options))
    lines += ["", "keys (key: type = value):"]
    values = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(values, dict)  # the container of a DictConfig
    lines += _key_lines(schema, values, "")
    return "\n".join(lines)


def _compose(config_name: str, overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """The composed config (without `hydra`) and the chosen option of each of its groups."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(str(e)) from None
    choices = {g: c for g, c in cfg.hydra.runtime.choices.items() if not g.startswith("hydra")}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


def _key_lines(schema: type, values: dict, prefix: str) -> Iterator[str]:
    """One entry per field of `schema` (nested dataclasses recurse with dotted keys)."""
    docs = field_docs(schema)
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key, value = prefix + f.name, values.get(f.name)
        nested = _dataclass_in(hints[f.name])
        if nested is not None and isinstance(value, dict):
            yield from _key_lines(nested, value, key + ".")
            continue
        shown = value if isinstance(value, str) else json.dumps(value)
        yield f"  {key}: {f.type} = {shown}"
        if f.name in docs:
            yield textwrap.fill(
                docs[f.name], width=96, initial_indent=" " * 6, subsequent_indent=" " * 6
            )


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass: {field: the string literal right below it}."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(node, ast.ClassDef)  # the source of a class
    body = node.body
    return {
        a.target.id: " ".join(b.value.value.split())
        for a, b in zip(body, body[1:])
        if isinstance(a, ast.AnnAssign)
        and isinstance(a.target, ast.Name)
        and isinstance(b, ast.Expr)
        and isinstance(b.value, ast.Constant)
        and isinstance(b.value.value, str)
    }
