"""Results on disk (written atomically) and Weights & Biases logging."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from svdexp.faults import crash_point


def _jsonable(value: Any) -> Any:
    """Non-finite floats become the strings "inf"/"-inf"/"nan" so results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json_atomic(path: str | Path, data: dict) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(_jsonable(data), fh, indent=2, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    crash_point("results_write")
    os.replace(tmp, path)


def read_results(path: str | Path) -> dict | None:
    """The results in ``path``, or ``None`` when the file is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


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
            self.run.config.update({"environment": _jsonable(results["environment"])}, allow_val_change=True)
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
