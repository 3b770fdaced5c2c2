"""``results.json`` (written atomically, read back, reused when a finished run's config is run again) and Weights &
Biases logging."""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from svdexp.errors import NumericalError
from svdexp.faults import atomic_write
from svdexp.record import provenance

# Settings that change how a run is done or logged, never its results: a finished run is not redone for them.
NOT_RESULT_KEYS = {"logger": None, "cache": None, "calib": ("cache", "cache_svd"),
                   "eval": ("cache_dense", "cache_responses")}


def jsonable(value: Any) -> Any:
    """Non-finite floats become the strings "inf"/"-inf"/"nan" so results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(jsonable(data), fh, indent=2, allow_nan=False)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write, "results_write")


def read_results(path: str | Path) -> dict | None:
    """The results in ``path``, or ``None`` when the file is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def result_identity(config: dict) -> dict:
    """The resolved config without :data:`NOT_RESULT_KEYS` (what decides whether a finished run is reusable)."""
    out = dict(config)
    for group, keys in NOT_RESULT_KEYS.items():
        if keys is None:
            out.pop(group, None)
        elif isinstance(out.get(group), dict):
            out[group] = {k: v for k, v in out[group].items() if k not in keys}
    return out


def finished_results(output_dir: Path, resolved: dict) -> dict | None:
    """The results already in ``output_dir`` when they are a finished run of this config (not run again); with
    ``sweep.reuse=same_code``, only when its svdexp commit and library versions are those of the running code."""
    previous = read_results(output_dir / "results.json")
    identity = lambda config: result_identity({**config, "sweep": {k: v for k, v in (config.get("sweep") or {}).items()
                                                                   if k != "reuse"}})   # noqa: E731 (how to reuse)
    if (previous and previous.get("status") == "done" and "save_error" not in previous.get("compression", {})
            and identity(previous.get("config") or {}) == identity(resolved)):
        if (resolved.get("sweep") or {}).get("reuse") == "same_code":
            changed = provenance.code_changes(previous.get("environment"), provenance.code_environment())
            if changed:
                print(f"[svdexp] {output_dir} is done for this config by other code ({'; '.join(changed)}); "
                      "re-running (sweep.reuse=same_code)")
                return None
        print(f"[svdexp] {output_dir} is already done for this config; skipping (delete results.json to re-run)")
        return previous
    return None


@contextmanager
def failure_recorded(output_dir: Path, resolved: dict, logger) -> Iterator[None]:
    """A numerical fault is a result worth keeping (which layer, which statistic), but never "done": it is
    written to ``results.json`` as failed. Any failure closes the W&B run with exit code 1."""
    try:
        yield
    except NumericalError as err:
        write_json_atomic(output_dir / "results.json", {"status": "failed", "error": str(err), "config": resolved})
        if logger is not None:
            logger.finish(exit_code=1)
        raise
    except BaseException:
        if logger is not None:
            logger.finish(exit_code=1)
        raise


def flatten(data: dict, sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``: every leaf (lists stay values), keys joined by ``sep``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, sep, f"{prefix}{key}{sep}") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


class WandbLogger:
    """A W&B run for one svdexp run: resolved config (and results.json's ``environment`` as the config group
    ``environment``, so that runs can be filtered by commit, versions or device), metrics in the summary, a
    per-layer rank table."""

    def __init__(self, cfg, config: dict, output_dir: Path) -> None:
        import wandb

        self.wandb = wandb
        tags = list(cfg.tags) + [f"method:{cfg.method.name}", f"allocation:{cfg.allocation.name}",
                                 f"model:{cfg.model.name}"]
        self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                              mode=cfg.logger.mode, dir=str(output_dir), config=config, tags=tags,
                              job_type="compress", reinit="finish_previous")

    def log_results(self, results: dict) -> None:
        if "environment" in results:   # complete now: finished, seconds per stage
            self.run.config.update({"environment": jsonable(results["environment"])}, allow_val_change=True)
        summary = {k: v for k, v in flatten({k: results[k] for k in ("metrics", "compression", "model") if k in results}
                                            ).items() if v is None or isinstance(v, (int, float, str, bool))}
        summary.pop("compression/ranks", None)
        self.run.summary.update(summary)
        ranks = results.get("compression", {}).get("ranks", {})
        if ranks:
            table = self.wandb.Table(columns=["matrix", "rank"], data=[[k, v] for k, v in ranks.items()])
            self.run.log({"ranks": table})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_logger(cfg, config: dict, output_dir: Path) -> WandbLogger | None:
    """The configured logger (``logger.mode=disabled`` still runs real W&B, which then records nothing)."""
    return None if cfg.logger.name == "none" else WandbLogger(cfg, config, output_dir)


def log_report_table(records: list[dict], group: str, config: dict, logger_cfg: Any, out_dir: Path,
                     image: Path | None = None) -> None:
    """Log a sweep report's ``records`` as a ``wandb.Table`` (and ``image``) in a ``job_type="report"`` run."""
    import wandb
    from omegaconf import DictConfig, OmegaConf

    opts = OmegaConf.to_container(logger_cfg, resolve=True) if isinstance(logger_cfg, DictConfig) else logger_cfg or {}
    columns = list(records[0])
    run = wandb.init(project=opts.get("project", "svdexp"), entity=opts.get("entity"), group=group, job_type="report",
                     mode=opts.get("mode", "offline"), dir=str(out_dir), name=f"report-{group}", config=config,
                     reinit="finish_previous")
    try:
        run.log({"report": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in records])})
        if image is not None and image.is_file():
            run.log({image.stem: wandb.Image(str(image))})
    finally:
        run.finish()
