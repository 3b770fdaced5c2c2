"""Row labels as the papers name methods, ``SVD-LLM (closed-form update) + adaCR [alpha=0.25]``: method, update,
policy, non-default options, and where two experiments would still share a label, the config keys that differ."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import OmegaConf

from svdexp.record.tracking import flatten

log = logging.getLogger("svdexp.report")

METHOD_LABELS = {"none": "Dense", "svd": "SVD", "fwsvd": "FWSVD", "asvd": "ASVD", "svd_llm": "SVD-LLM",
                 "adasvd": "AdaSVD", "ressvd": "ResSVD"}
ALLOCATION_LABELS = {"adacr": "adaCR", "last_layers": "last-layers"}
# Config keys that never tell two experiments apart (where/how fast they ran, how they were logged); for the dense
# model, neither do the method, the allocation and the calibration.
IGNORED_KEYS = ("sweep", "logger", "tags", "device", "hydra", "ratio", "calib.batch_size", "calib.cache",
                "calib.cache_svd", "eval.ppl.batch_size", "eval.zeroshot.batch_size", "eval.cache_dense",
                "eval.cache_responses", "eval.dense_baseline")
IGNORED_DENSE = ("method", "allocation", "calib")


def row_order(method: str, update: str = "none", allocation: str = "uniform") -> tuple[int, bool, int]:
    """How rows sort: methods in the papers' order, the update variant after the plain one, then the policy."""
    methods, policies = list(METHOD_LABELS), ["uniform", "adacr", "last_layers"]
    return (methods.index(method) if method in methods else len(methods), update != "none",
            policies.index(allocation) if allocation in policies else len(policies))


@functools.cache
def _option_defaults(group: str, name: str) -> dict[str, Any]:
    """Defaults of a method/allocation option: the schema's dataclass, overlaid by its YAML in the packaged config
    tree (``svdexp/conf/<group>/<name>.yaml``)."""
    from svdexp.config import CONFIG_DIR, AllocationConfig, MethodConfig

    schema = {"method": MethodConfig, "allocation": AllocationConfig}[group]
    defaults = {f.name: f.default for f in dataclasses.fields(schema) if f.default is not dataclasses.MISSING}
    path = Path(CONFIG_DIR) / group / f"{name}.yaml"
    try:   # a broken YAML must not stop the report
        defaults.update(OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else {})
    except Exception as err:
        log.warning("svdexp-report: could not read %s: %s", path, err)
    return defaults


def _fmt_option(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _differs(value: Any, default: Any) -> bool:
    if isinstance(value, (int, float)) and isinstance(default, (int, float)) and not isinstance(value, bool):
        return not math.isclose(float(value), float(default), rel_tol=1e-9, abs_tol=0.0)
    return value != default


def option_extras(config: dict, method: str, allocation: str) -> list[str]:
    """Non-default method and allocation options, as ``key=value`` (the update variant has its own words)."""
    out = []
    for group, name in (("method", method), ("allocation", allocation)):
        defaults = _option_defaults(group, name)   # unknown keys only show up where they separate two rows
        out += [f"{'K' if (group, key) == ('allocation', 'num_layers') else key}={_fmt_option(value)}"
                for key, value in (config.get(group) or {}).items()
                if key not in ("name", "update") and key in defaults and _differs(value, defaults[key])]
    return out


def make_label(method: str, update: str = "none", allocation: str = "uniform", extras: list[str] | None = None
               ) -> str:
    """Row label like the papers': ``SVD-LLM (closed-form update) + adaCR [alpha=0.25]``."""
    label = METHOD_LABELS.get(method, method)
    if method != "none" and update not in ("none", "", None):
        label += " (closed-form update)" if update == "closed_form" else f" ({update} update)"
    if method != "none" and allocation != "uniform":
        label += f" + {ALLOCATION_LABELS.get(allocation, allocation)}"
    return f"{label} [{', '.join(extras)}]" if extras else label


def disambiguate(jobs: pd.DataFrame) -> pd.Series:
    """The row labels; where one (model, label) holds different experiments, the keys that differ join the label."""
    labels = jobs["row"].copy()
    for _, group in jobs.groupby(["model", "row"], sort=False):
        ignored = IGNORED_KEYS + (IGNORED_DENSE if group["dense"].iloc[0] else ())
        idents = [{k: json.dumps(v, sort_keys=True) for k, v in flatten(config, ".").items()
                   if not any(k == p or k.startswith(p + ".") for p in ignored)} for config in group["config"]]
        varying = [k for k in sorted({k for i in idents for k in i}) if len({i.get(k) for i in idents}) > 1]
        for index, ident in zip(group.index, idents if varying else []):
            extra = ", ".join(f"{k}={_fmt_option(json.loads(ident[k])) if k in ident else 'unset'}" for k in varying)
            label = labels[index]
            labels[index] = f"{label[:-1]}, {extra}]" if label.endswith("]") else f"{label} [{extra}]"
    return labels
