"""The Hydra entry point (`svdexp`): compose the config, validate, hand over to the runner with this job's threads,
print a summary."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from svdexp.config import CONFIG_DIR, check_override_keys, register_configs
from svdexp.errors import ConfigError, NumericalError, SaveError

register_configs()

# The environment of a process that must not reach the network (the tests, the benchmarks: the packaged model and
# the embedded data need none): Hugging Face hub, datasets and transformers offline, W&B off.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def job_threads(threads: int | None) -> int:
    """The torch/OpenMP threads of this job: ``threads`` when set, else this process's cores divided by the
    jobs its launcher runs at once (``hydra.launcher.n_jobs``; 1 outside a parallel launcher), so that a
    parallel sweep does not start n_jobs x cores threads on the same cores."""
    if threads is not None:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = 1
    if HydraConfig.initialized():
        n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=None)
        jobs = cores if isinstance(n_jobs, int) and n_jobs < 1 else (n_jobs or 1)   # joblib: -1 = every core
    return max(1, cores // jobs)


def summary(results: dict) -> str:
    """A few human-readable lines: what was compressed, how much, and the perplexities."""
    c, m = results["compression"], results["metrics"]
    lines = [f"svdexp: {results['model']['name']} | method={c['method']} allocation={c['allocation']} "
             f"target ratio={c['target_ratio']:.3f}",
             f"  removed: {c['achieved_ratio_targeted']:.4f} of targeted matrices, "
             f"{c['achieved_ratio_model']:.4f} of the whole model | weights {c['weight_bytes'] / 2**20:.1f} MiB | "
             f"compression {c['seconds']:.1f} s"]
    for name, ppl in m["ppl"].items():
        dense = m.get("dense_ppl", {}).get(name)
        before = f"dense {dense:.2f} -> " if dense is not None else ""
        lines.append(f"  perplexity {name}: {before}{ppl:.2f}")
    if "zeroshot" in m:
        for task, r in m["zeroshot"].items():
            if task == "mean_acc":
                continue
            dense = m.get("dense_zeroshot", {}).get(task, {}).get("acc")
            before = f"dense {dense:.3f} -> " if dense is not None else ""
            lines.append(f"  zero-shot {task} acc ({r.get('samples')} docs): {before}{r['acc']:.3f}")
    return "\n".join(lines)


def _check_targets(hydra_cfg) -> None:
    """svdexp instantiates nothing from configs itself; Hydra's callbacks must be the project's own classes."""
    for name, callback in (hydra_cfg.callbacks or {}).items():
        target = str(callback.get("_target_", ""))
        if not target.startswith("svdexp."):
            raise ConfigError(f"hydra.callbacks.{name}._target_={target!r} is not allowed: only svdexp's own "
                              "classes (svdexp.*) may be instantiated from a config.")


# Third-party log records that say nothing to an svdexp user, as (logger, words of the message): lm-eval's notes
# on wrapping a model object (svdexp always passes its loaded model) and its hint about `--metadata` (a flag of its
# own command line), each once per task and evaluation. The console drops them; the run's log file keeps them.
CONSOLE_NOISE = (
    ("lm_eval.models.huggingface", "model kwarg is not of type `str`"),
    ("lm_eval.models.huggingface", "Passed an already-initialized model"),
    ("lm_eval.api.task", "Custom kwargs can be passed to `--metadata`"),
)


class ConsoleNoise(logging.Filter):
    """Drops the records of :data:`CONSOLE_NOISE`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == name and words in record.getMessage() for name, words in CONSOLE_NOISE)


def quiet_console() -> None:
    """Put :class:`ConsoleNoise` on the console handlers of the logging Hydra set up for this job (its
    ``<run dir>/<job name>.log`` file handler keeps every record)."""
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, ConsoleNoise) for f in handler.filters):
            handler.addFilter(ConsoleNoise())


# Exit codes: 2 a bad configuration (nothing was run), 3 a numerical failure (results.json says "failed"),
# 4 the checkpoint could not be saved (results.json holds the metrics and the error).
EXIT_CODES = {ConfigError: 2, NumericalError: 3, SaveError: 4}
_job_started = False   # Hydra exits 1 both for a config it cannot compose and for a crash inside a job


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _job(cfg: DictConfig) -> None:
    from svdexp.runner import run

    global _job_started
    _job_started = True
    quiet_console()
    try:
        _check_targets(HydraConfig.get())
        results = run(cfg, HydraConfig.get().runtime.output_dir, job_threads(cfg.threads))
    except tuple(EXIT_CODES) as err:
        kind = {ConfigError: "configuration error", NumericalError: "numerical failure",
                SaveError: "checkpoint not saved"}[type(err)]
        print(f"svdexp: {kind}: {err}", file=sys.stderr)
        sys.exit(EXIT_CODES[type(err)])
    print(summary(results), flush=True)


def main(argv: list[str] | None = None) -> None:
    """``svdexp [overrides]``: unknown keys are refused before Hydra composes; a config Hydra cannot compose
    (a value of the wrong type, a missing group option) exits 2 like every other configuration error.

    ``argv`` (the overrides, without the program name; default ``sys.argv[1:]``) runs the app in this process
    exactly as from the shell: the tests call it so, and it ends, as from the shell, with ``SystemExit`` on
    any failure (exit codes in :data:`EXIT_CODES`)."""
    global _job_started
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        check_override_keys(args)
    except ConfigError as err:
        print(f"svdexp: configuration error: {err}", file=sys.stderr)
        sys.exit(2)
    _job_started = False
    program, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "svdexp", *args]   # what hydra.main parses
    try:
        _job()
    except SystemExit as done:
        if done.code == 1 and not _job_started:
            sys.exit(2)
        raise
    finally:
        sys.argv = program


if __name__ == "__main__":
    main()
