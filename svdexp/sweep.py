"""`svdexp-sweep`: run a sweep file as one Hydra multirun per grid.

The sweep is a name of the files shipped with the package (svdexp/sweeps/<name>.yaml) or the path of a file of
yours. A sweep file names the table it regenerates and lists grids; each grid is a Cartesian product of
comma-separated values (Hydra's sweep syntax), so ``none`` needs no ratio column while the methods do::

    name: svd_llm_table1
    paper_table: svd_llm_table1
    overrides: []                       # applied to every job
    grids:
      - {method: none}
      - {method: "svd,svd_llm", ratio: "0.2,0.4"}

Jobs land in ``outputs/sweeps/<name>/<override dirname>`` under the current folder; re-running skips jobs already
done for the same resolved config (with ``sweep.reuse=same_code``, only those done by the same svdexp commit and
library versions).
Extra command-line overrides (``model=llama_7b``, ``hydra/launcher=slurm``) go to every job.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from svdexp.errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

# The packaged sweep files (package data), found through the package: installed or editable alike.
SWEEP_DIR = files("svdexp") / "sweeps"
SWEEP_KEYS = ("name", "description", "paper_table", "overrides", "grids")


def find_sweep(spec: str) -> Path | Traversable:
    """A sweep file from a path (a file of yours) or a name of the packaged ones (svdexp/sweeps/<name>.yaml)."""
    path = Path(spec)
    if path.is_file():
        return path
    candidate = SWEEP_DIR / f"{spec}.yaml"
    if candidate.is_file():
        return candidate
    names = sorted(p.name.removesuffix(".yaml") for p in SWEEP_DIR.iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(f"sweep {spec!r} not found; give a file path or one of: {', '.join(names)}.")


def load_sweep(path: Path | Traversable) -> dict:
    """The sweep file as a dict, its keys checked (a typo is an error, not an ignored line)."""
    with path.open("r", encoding="utf-8") as text:
        data = OmegaConf.to_container(OmegaConf.load(text), resolve=True)
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"sweep file {path} has unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(SWEEP_KEYS)}.")
    if not data.get("name") or not isinstance(data.get("grids"), list) or not data["grids"]:
        raise ConfigError(f"sweep file {path} needs a 'name' and a non-empty list 'grids'.")
    return data


def _value(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def grid_overrides(grid: dict) -> list[str]:
    return [f"{key}={_value(value)}" for key, value in grid.items()]


def check_grid(overrides: list[str]) -> None:
    """Compose the first job of a grid so that a bad key or value fails now, not in every job."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from svdexp.config import CONFIG_DIR, register_configs, validate
    from svdexp.report.published import check_paper_table

    register_configs()
    first = [o.split("=", 1)[0] + "=" + o.split("=", 1)[1].split(",")[0] if "=" in o else o for o in overrides]
    first = [o for o in first if not o.startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=first)
    except HydraException as err:
        raise ConfigError(f"sweep job overrides {first} are invalid: {err}") from None
    validate(cfg)
    check_paper_table(cfg.sweep.paper_table)


def commands(sweep: dict, extra: list[str]) -> list[list[str]]:
    """One `python -m svdexp.app -m ...` command per grid."""
    common = [*sweep.get("overrides", []), f"hydra.sweep.dir=outputs/sweeps/{sweep['name']}",
              f"sweep.name={sweep['name']}", f"logger.group={sweep['name']}"]
    if sweep.get("paper_table"):
        common.append(f"sweep.paper_table={sweep['paper_table']}")
    common += extra   # last, so the command line wins (e.g. hydra.sweep.dir=...)
    return [[sys.executable, "-m", "svdexp.app", "-m", *grid_overrides(grid), *common] for grid in sweep["grids"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svdexp-sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="sweep name (one of svdexp/sweeps/) or path to a sweep file of yours")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every job, e.g. model=llama_7b")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(find_sweep(args.sweep))
        cmds = commands(sweep, args.overrides)
        for grid in sweep["grids"]:
            check_grid([*grid_overrides(grid), *sweep.get("overrides", []), *args.overrides])
    except ConfigError as err:
        print(f"svdexp-sweep: configuration error: {err}", file=sys.stderr)
        return 2
    failed = 0
    for cmd in cmds:
        print("+", " ".join(cmd[2:]), flush=True)
        if not args.dry_run:
            failed += subprocess.run(cmd).returncode != 0
    if failed:
        print(f"svdexp-sweep: {failed} of {len(cmds)} grid(s) had failing jobs; re-run to resume.", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
