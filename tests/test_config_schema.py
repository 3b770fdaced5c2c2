"""Every key of the schema refuses a bad value before any work: exit 2, a message naming the key and what is
allowed, no traceback, no results.json, no cache entry. Plus the five traps of issue 14."""

from __future__ import annotations

import json

import pytest

from conftest import CONF, TINY, run_process, run_svdexp
from svdexp import app
from svdexp.config import schema_leaves, unknown_key_error

# One invalid value of its kind per leaf key of the schema: (overrides, what the message must also say).
# Values of the right type but out of range or choice are svdexp's validate(); values of the wrong type are
# refused by Hydra while it merges the override into the schema (its message carries "full_key: <key>").
INVALID = {
    "model.name": (["model.name=''"], "choose a non-empty name"),
    "model.source": (["model.source=s3"], "choose one of: gguf_package, pretrained, tiny_random"),
    "model.path": (["model=pretrained", "model.path=/nonexistent/model"], "does not exist"),
    "model.package": (["model=smollm2_135m", "model.package=no_such_package"], "not an installed package"),
    "model.gguf_file": (["model=smollm2_135m", "model.gguf_file=nope.gguf"], "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "model.family": (["model.family=lama"], "did you mean llama"),
    "model.revision": (["model.revision=v2"], "is not read by model source 'tiny_random'"),
    "model.trust_remote_code": (["model.trust_remote_code=maybe"], "not a valid bool"),
    "model.seq_len": (["model.seq_len=0"], "must be a positive integer"),
    "model.tiny": (["model.tiny=5"], "Cannot assign int"),
    # method.* and allocation.* are the options of the methods and policies (svdexp/methods/, svdexp/allocation/),
    # each set with a method (policy) that has it: another one refuses it whatever its value (tests/test_options.py)
    "method.name": (["method.name=magic"], "choose one of: adasvd, asvd"),
    "method.propagate": (["method.propagate=sideways"], "choose one of: original, compressed"),
    "method.damping": (["method.damping=0"], "(0, 1)"),
    "method.update": (["method.update=sometimes"], "choose one of: none, closed_form"),
    "method.alpha": (["method=asvd", "method.alpha=-1"], "choose a number >= 0"),
    "method.fisher": (["method=fwsvd", "method.fisher=diag"], "choose one of: rows, columns"),
    "method.iters": (["method=adasvd", "method.iters=-1"], "choose an integer >= 0"),
    "method.groups": (["method=adasvd", "method.groups=-1"], "choose an integer >= 0"),
    "method.beta": (["method=ressvd", "method.beta=1.5"], "[0, 1)"),
    "method.space": (["method=ressvd", "method.space=curved"], "choose one of: plain, whitened"),
    "method.solver": (["method.solver=qr"], "choose one of: auto, svd"),
    "allocation.name": (["allocation.name=greedy"], "choose one of: adacr, erank, global, last_layers, uniform, v2"),
    "allocation.min_keep": (["allocation=adacr", "allocation.min_keep=1.5"], "(0, 1]"),
    "allocation.num_layers": (["allocation=last_layers", "allocation.num_layers=often"],
                              "choose 'auto' or an integer >= 1"),
    "allocation.score": (["allocation=global", "allocation.score=hessian"],
                         "choose one of: first_order, truncation_loss"),
    "allocation.alpha": (["allocation=erank", "allocation.alpha=0"], "choose a number > 0"),
    "calib.dataset": (["calib.dataset=imdb"], "choose one of:"),
    "calib.num_samples": (["calib.num_samples=0"], "must be a positive integer"),
    "calib.seq_len": (["calib.seq_len=0"], "must be a positive integer"),
    "calib.batch_size": (["calib.batch_size=0"], "must be a positive integer"),
    "calib.cache": (["calib.cache=maybe"], "not a valid bool"),
    "calib.cache_svd": (["calib.cache_svd=maybe"], "not a valid bool"),
    "calib.bos": (["calib.bos=maybe"], "choose one of: auto, true, false"),
    "calib.activations": (["calib.activations=swap"], "choose one of: auto, memory, disk"),
    "eval.ppl.datasets": (["eval.ppl.datasets=[wiki,imdb]"], "choose one of:"),
    "eval.ppl.seq_len": (["eval.ppl.seq_len=1"], "choose an integer >= 2"),
    "eval.ppl.max_chunks": (["eval.ppl.max_chunks=0"], "must be a positive integer"),
    "eval.ppl.batch_size": (["eval.ppl.batch_size=0"], "must be a positive integer"),
    "eval.ppl.bos": (["eval.ppl.bos=1"], "choose one of: auto, true, false"),
    "eval.zeroshot.tasks": (["eval.zeroshot.tasks=[arc_easy_embeded]"], "arc_easy_embedded"),
    "eval.zeroshot.limit": (["eval.zeroshot.limit=-3"], "an int >= 1 or a fraction in (0, 1)"),
    "eval.zeroshot.batch_size": (["eval.zeroshot.batch_size=0"], "must be a positive integer"),
    "eval.zeroshot.num_fewshot": (["eval.zeroshot.num_fewshot=-1"], "choose an integer >= 0"),
    "eval.zeroshot.dtype": (["eval.zeroshot.dtype=int8"], "choose one of: bfloat16, float16, float32"),
    "eval.dense_baseline": (["eval.dense_baseline=maybe"], "not a valid bool"),
    "eval.cache_dense": (["eval.cache_dense=maybe"], "not a valid bool"),
    "eval.cache_responses": (["eval.cache_responses=maybe"], "not a valid bool"),
    "logger.name": (["logger.name=slack"], "choose one of: wandb, none"),
    "logger.mode": (["logger.mode=loud"], "choose one of: offline, online, disabled"),
    "logger.project": (["logger.project=''"], "choose a non-empty name"),
    "logger.entity": (["logger.entity=''"], "choose a non-empty name"),
    "logger.group": (["logger.group=''"], "choose a non-empty name"),
    "sweep.name": (["sweep.name=''"], "choose a non-empty name"),
    "sweep.paper_table": (["sweep.paper_table=no_table"], "choose one of:"),
    "sweep.reuse": (["sweep.reuse=always"], "choose one of: any, same_code"),
    "ratio": (["ratio=1.5"], "must be a number in [0, 1)"),
    "seed": (["seed=-1"], "choose an integer >= 0"),
    "device": (["device=tpu"], "choose cpu, cuda, cuda:N or mps"),
    "dtype": (["dtype=int8"], "choose one of: bfloat16, float16, float32"),
    "threads": (["threads=0"], "must be a positive integer"),
    "tags": (["tags=['']"], "non-empty strings"),
    "save": (["save=5"], "must be false, true"),
    "cache.max_gb": (["cache.max_gb=0"], "choose a number of gigabytes > 0"),
}


def call_svdexp(tmp_path, *overrides: str) -> tuple[int, str]:
    """The real entry point in this process (Hydra composes as from the shell); returns (exit code, stderr)."""
    proc = run_svdexp([*TINY, *overrides], tmp_path / "run", cache=tmp_path / "cache")
    return proc.returncode, proc.stderr


def test_every_leaf_of_the_schema_has_an_invalid_example():
    assert set(INVALID) == set(schema_leaves())


@pytest.mark.parametrize("key", sorted(INVALID))
def test_invalid_value_is_refused_naming_key_and_allowed(tmp_path, key):
    overrides, allowed = INVALID[key]
    code, stderr = call_svdexp(tmp_path, *overrides)
    assert code == 2, stderr[-2000:]
    assert key in stderr and allowed in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "cache").exists()


def run_cli(tmp_path, *overrides: str):
    return run_svdexp(list(overrides), tmp_path / "run", cache=tmp_path / "cache")


def test_trap1_model_path_is_refused_by_the_packaged_model(tmp_path):
    proc = run_cli(tmp_path, "logger=none", "model.path=/nonexistent/model")
    assert proc.returncode == 2
    assert "model.path='/nonexistent/model' is not read by model=smollm2_135m" in proc.stderr
    assert "model=pretrained model.path=/nonexistent/model" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "cache").exists()


def test_trap1_model_pretrained_loads_a_local_folder_named_after_it(tmp_path):
    from omegaconf import OmegaConf
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from svdexp.models.loading import _package_dir

    tiny = OmegaConf.load(CONF / "model" / "tiny_random.yaml")
    folder = tmp_path / "my-tiny-llama"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **tiny.tiny)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(_package_dir(tiny.package)), gguf_file=tiny.gguf_file).save_pretrained(folder)
    small = [o for o in TINY if not o.startswith("model=")]
    proc = run_cli(tmp_path, *small, "model=pretrained", f"model.path={folder}", "method=svd")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"]["name"] == "my-tiny-llama"
    assert results["config"]["model"]["path"] == str(folder)


@pytest.mark.parametrize("override,suggestion", [
    ("+unknown_key=1", None),
    ("calib.num_sample=8", "calib.num_samples"),
    ("+calib.num_sample=8", "calib.num_samples"),
    ("++calib.num_sample=8", "calib.num_samples"),
    ("+method.alhpa=0.3", "method.alpha"),
])
def test_trap2_keys_outside_the_schema_are_refused_whatever_the_prefix(tmp_path, override, suggestion):
    code, stderr = call_svdexp(tmp_path, override)
    key = override.lstrip("+").split("=")[0]
    assert code == 2 and f"{key} is not a setting of svdexp" in stderr, stderr
    if suggestion:
        assert f"did you mean {suggestion}?" in stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_trap2_unknown_keys_in_the_composed_config_are_found():
    """The same check on the composed config (a key added by a config file, not the command line)."""
    from hydra import compose, initialize_config_dir

    from svdexp.config import ConfigError, validate

    with initialize_config_dir(config_dir=app.CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "+eval.ppl.max_chunk=3"])
    with pytest.raises(ConfigError, match=r"eval.ppl.max_chunk is not a setting .*did you mean eval.ppl.max_chunks"):
        validate(cfg)
    assert unknown_key_error("model.tiny.num_hidden_layers") is None   # free-form: transformers config kwargs
    assert unknown_key_error("hydra.launcher.n_jobs") is None


def test_trap3_negative_zeroshot_limit(tmp_path):
    proc = run_cli(tmp_path, *TINY, "eval.zeroshot.tasks=[arc_easy_embedded]", "eval.zeroshot.limit=-3")
    assert proc.returncode == 2 and "eval.zeroshot.limit must be null" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_trap4_unwritable_save_target_fails_before_any_work(tmp_path):
    proc = run_cli(tmp_path, *TINY, "save=/proc/forbidden/x")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "save='/proc/forbidden/x' cannot be written" in proc.stderr
    assert "calibration" not in proc.stderr and not (tmp_path / "cache").exists()
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.integration
def test_trap4_a_checkpoint_that_fails_late_keeps_the_results(tmp_path):
    """A file-size limit of 1 MB (a real OS error, EFBIG, like a full disk) lets results.json through but not the
    checkpoint: exit 4, results.json has the metrics and the error, no half-written folder."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    target = tmp_path / "ckpt"
    proc = run_process([*TINY, "calib.cache=false", "calib.cache_svd=false", "eval.cache_dense=false",
                        f"save={target}"], tmp_path / "run", tmp_path / "cache", preexec=limit_file_size)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "checkpoint not saved" in proc.stderr and "results.json" in proc.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "done" and "save_error" in results["compression"]
    assert results["metrics"]["ppl"]["wiki"] > 0
    assert not any(target.parent.glob(f".{target.name}.tmp*")) and not (target / "model.safetensors").exists()


def test_trap5_schema_is_no_option_of_any_group(tmp_path):
    help_text = run_svdexp(["--help"]).stdout
    section = help_text.split("== Config groups")[1].split("== Settings")[0]
    groups = [line for line in section.splitlines() if line.split(":")[0] in
              ("model", "method", "allocation", "calib", "eval", "logger")]
    assert len(groups) == 6 and not any("schema" in line for line in groups), help_text
    assert help_text.startswith("svdexp: compress") and "powered by Hydra" not in help_text   # the app's own text
    assert "svd_llm" in help_text and "last_layers" in help_text and "pretrained" in help_text
    for group in ("method", "model", "eval"):
        code, stderr = call_svdexp(tmp_path, f"{group}=schema")
        assert code == 2 and f"Could not find '{group}/schema'" in stderr, stderr
        assert "Traceback" not in stderr and not (tmp_path / "run" / "results.json").exists()
