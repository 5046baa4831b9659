"""The composed config at the start of a run: printed and saved, every interpolation resolved.

At a terminal it is a rich tree, one branch per section (as lightning-hydra-template's
`print_config_tree` draws it); in a log (SLURM, nohup, CI) it is plain YAML in one log line, so
that it is also in the run's `<task>.log`. Either way it is saved as `config_resolved.yaml` in the
run directory: `.hydra/config.yaml` is the config as written (`${...}` and all), this one holds
the values the run used. A resume, whose run directory holds the run's own file already, saves
its own beside Hydra's record of that invocation (`.hydra/invocation-<time>/`).

The YAML is compact: a mapping or list of plain values that fits on a line is written on one
(`clahe: {clip_limit: 2.0, tile_grid: 4}`), to keep the printout short.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from tb_lightning.core.atomic import atomic_write
from tb_lightning.core.run_dirs import launched_rank

log = logging.getLogger(__name__)

SAVED_NAME = "config_resolved.yaml"
# A collection of plain values is written on one line when it fits in this many characters.
FLOW_WIDTH = 88


def resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, interpolations resolved (`???` left as it is); unresolved
    where a value cannot be resolved, so that printing never stops a run."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - e.g. a resolver that needs what only the run makes
        data = OmegaConf.to_container(cfg, resolve=False)
    return data  # type: ignore[return-value]


class _CompactDumper(yaml.SafeDumper):
    """Block style, except for short collections of plain values (flow style, one line)."""


class _Block(dict):
    """A mapping always written in block style (the top level: one key a line)."""


def _is_plain(value: Any) -> bool:
    return not isinstance(value, dict | list)


def _flow_fits(data: dict | list) -> bool:
    values = data.values() if isinstance(data, dict) else data
    if not data or not all(_is_plain(v) for v in values):
        return False
    text = yaml.dump(data, Dumper=yaml.SafeDumper, default_flow_style=True, width=10_000)
    return len(text.strip()) <= FLOW_WIDTH


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    return dumper.represent_mapping("tag:yaml.org,2002:map", data, flow_style=_flow_fits(data))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=_flow_fits(data))


_CompactDumper.add_representer(dict, _represent_dict)
_CompactDumper.add_representer(
    _Block, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, False)
)
_CompactDumper.add_representer(list, _represent_list)


def compact_yaml(data: Any) -> str:
    """YAML that loads back to `data`, short collections of plain values on one line each
    (a mapping's own keys one a line)."""
    if isinstance(data, dict):
        data = _Block(data)
    return yaml.dump(data, Dumper=_CompactDumper, sort_keys=False, width=100, allow_unicode=True)


def saved_config_path(run_dir: Path) -> Path:
    """Where this invocation's resolved config goes: the run directory, or for a resume (whose
    run directory holds the run's own already) Hydra's folder for this invocation."""
    path = run_dir / SAVED_NAME
    if not path.exists():
        return path
    from hydra.core.hydra_config import HydraConfig

    subdir = HydraConfig.get().output_subdir if HydraConfig.initialized() else None
    if subdir and Path(subdir) != Path(".hydra"):
        return run_dir / subdir / SAVED_NAME
    return path  # the same invocation's folder (e.g. a multirun started again in it)


def print_config(cfg: DictConfig, run_dir: str | Path, tty: bool | None = None) -> Path | None:
    """Print the resolved config (a rich tree when stdout is a terminal, else YAML in the log)
    and save it in `run_dir`; returns the file (None in the other processes of a DDP run, which
    print nothing)."""
    if launched_rank() != 0:
        return None
    data = resolved(cfg)
    path = saved_config_path(Path(run_dir))
    atomic_write(path, compact_yaml(data))
    if tty is None:
        tty = sys.stdout.isatty()
    if tty:
        print_tree(data, path)
    else:
        log.info("Config (resolved, saved as %s):\n%s", path, compact_yaml(data).rstrip())
    return path


def print_tree(data: dict[str, Any], path: Path) -> None:
    """A rich tree: one branch per section, its YAML highlighted."""
    import rich
    from rich.syntax import Syntax
    from rich.tree import Tree

    def highlighted(value: dict[str, Any]) -> Syntax:
        text = compact_yaml(value).rstrip()
        return Syntax(text, "yaml", background_color="default", word_wrap=True)

    tree = Tree(f"CONFIG (resolved, saved as {path})", style="dim", guide_style="dim")
    # The top-level values (task_name, seed, ckpt_path, ...) first, together; then a branch a
    # section.
    plain = {k: v for k, v in data.items() if not (isinstance(v, dict) and v)}
    if plain:
        tree.add(highlighted(plain))
    for key, value in data.items():
        if key not in plain:
            tree.add(str(key), style="bold", guide_style="dim").add(highlighted(value))
    rich.print(tree)
