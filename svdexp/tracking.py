"""Results on disk (written atomically) and Weights & Biases logging."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


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
    os.replace(tmp, path)


def read_results(path: str | Path) -> dict | None:
    """The results in ``path``, or ``None`` when the file is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (scalars only), for W&B summaries."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


class WandbLogger:
    """A W&B run for one svdexp run: resolved config, metrics in the summary, a per-layer rank table."""

    def __init__(self, cfg, config: dict, output_dir: Path) -> None:
        import wandb

        self.wandb = wandb
        tags = list(cfg.tags) + [f"method:{cfg.method.name}", f"allocation:{cfg.allocation.name}",
                                 f"model:{cfg.model.name}"]
        self.run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                              mode=cfg.logger.mode, dir=str(output_dir), config=config, tags=tags,
                              job_type="compress", reinit="finish_previous")

    def log_results(self, results: dict) -> None:
        summary = flatten({k: results[k] for k in ("metrics", "compression", "model") if k in results})
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
