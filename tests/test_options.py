"""Each method's and each allocation policy's options, declared beside its code (svdexp/methods/*.py,
svdexp/allocation/): the config's ``method`` / ``allocation`` node is built from them, every option of another
method (policy) is refused before any work naming the chosen one's own options, every invalid value is refused
naming the key and what is allowed, and the resolved config (results.json's ``config``, what decides whether a
finished run is reused) is what it was before the options moved."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF, TINY, run_svdexp
from svdexp import app
from svdexp.allocation import ALLOCATIONS
from svdexp.config import AllocationConfig, MethodConfig, options_schema, validate
from svdexp.errors import ConfigError
from svdexp.methods import METHODS, Method, Options, option

REGISTRIES = {"method": METHODS, "allocation": ALLOCATIONS}
COMPOSED = ["model=tiny_random", "logger=none"]   # for compose(): the default 32 samples (adasvd's 8 groups)

# A valid value other than the default, per option: what a user would set. Every declared option has one (a new
# option without one fails test_every_option_is_in_the_tables).
VALID = {
    "method": {"propagate": "compressed", "damping": 1e-4, "update": "closed_form", "alpha": 0.25,
               "fisher": "columns", "iters": 2, "groups": 2, "beta": 0.1, "space": "whitened", "solver": "svd"},
    "allocation": {"min_keep": 0.3, "num_layers": 3, "score": "truncation_loss", "alpha": 2.0},
}

# Invalid values per option, of every kind the option can get wrong, and what the message must say. Wrong types
# for a typed option are Hydra's (it merges the override into the schema: "could not be converted", with the
# key as full_key); the rest is svdexp's validation walking the option's declaration.
INVALID = {
    "method": {
        "propagate": [("sideways", "choose one of: original, compressed")],
        "damping": [("0", "choose a number in (0, 1)"), ("1", "choose a number in (0, 1)"),
                    ("tiny", "could not be converted to Float")],
        "update": [("sometimes", "choose one of: none, closed_form")],
        "alpha": [("-1", "choose a number >= 0"), ("half", "could not be converted to Float")],
        "fisher": [("diag", "choose one of: rows, columns")],
        "iters": [("-1", "choose an integer >= 0"), ("1.5", "could not be converted to Integer")],
        "groups": [("-1", "choose an integer >= 0"), ("many", "could not be converted to Integer"),
                   ("5", "exceeds calib.num_samples=4")],   # across groups: AdaSVDOptions.check
        "beta": [("1.0", "choose a number in [0, 1)"), ("-0.1", "choose a number in [0, 1)"),
                 ("big", "could not be converted to Float")],
        "space": [("curved", "choose one of: plain, whitened")],
        "solver": [("qr", "choose one of: auto, svd")],
    },
    "allocation": {
        "min_keep": [("0", "choose a number in (0, 1] (or null)"), ("1.5", "choose a number in (0, 1] (or null)"),
                     ("half", "could not be converted to Float")],
        "num_layers": [("often", "choose 'auto' or an integer >= 1"), ("0", "choose 'auto' or an integer >= 1"),
                       ("2.5", "choose 'auto' or an integer >= 1")],
        "score": [("hessian", "choose one of: first_order, truncation_loss")],
        "alpha": [("0", "choose a number > 0"), ("-1", "choose a number > 0"),
                  ("steep", "could not be converted to Float")],
    },
}


def options_of(group: str, name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(REGISTRIES[group][name].options)]


def owner(group: str, key: str) -> str:
    """The first method (policy) that has option ``key``."""
    return next(name for name in REGISTRIES[group] if key in options_of(group, name))


def declared(group: str) -> set[str]:
    return {key for name in REGISTRIES[group] for key in options_of(group, name)}


FOREIGN = [(group, name, key) for group in REGISTRIES for name in REGISTRIES[group]
           for key in sorted(declared(group)) if key not in options_of(group, name)]
CASES = [(group, key, value, expected) for group in INVALID for key, cases in INVALID[group].items()
         for value, expected in cases]


def test_every_option_is_in_the_tables():
    for group in REGISTRIES:
        assert set(VALID[group]) == declared(group) == set(INVALID[group]), group


def test_the_schema_node_is_built_from_the_declarations():
    """One field per option of any method (policy), with the type and the default of its one declaration."""
    for group, schema in (("method", MethodConfig), ("allocation", AllocationConfig)):
        fields = {f.name: f for f in dataclasses.fields(schema)}
        hints = typing.get_type_hints(schema)
        assert set(fields) == {"name"} | declared(group)
        for name, entry in REGISTRIES[group].items():
            own_hints = typing.get_type_hints(entry.options)
            for f in dataclasses.fields(entry.options):
                assert (fields[f.name].default, hints[f.name]) == (f.default, own_hints[f.name]), (name, f.name)
                assert f.metadata["help"] and (f.metadata["choices"] or f.metadata["low"] is not None
                                              or f.metadata["high"] is not None), (name, f.name)


def test_an_option_declared_twice_otherwise_is_refused():
    @dataclasses.dataclass(frozen=True)
    class First(Options):
        alpha: float = option(0.5, "an exponent", low=0.0)

    @dataclasses.dataclass(frozen=True)
    class Second(Options):
        alpha: float = option(1.0, "an exponent", low=0.0)

    with pytest.raises(TypeError, match="second declares option alpha otherwise than first"):
        options_schema("Node", {"first": Method("first", None, options=First),
                                "second": Method("second", None, options=Second)})
    node = options_schema("Node", {"first": Method("first", None, options=First),
                                   "again": Method("again", None, options=First)})
    assert [f.name for f in dataclasses.fields(node)] == ["name", "alpha"]


# What `svdexp --cfg job` printed for each method and policy before the options moved beside their code: every
# key of the node, in this order, with these values. results.json keeps the resolved config and a finished run is
# reused only for an identical one, so a changed default or a lost key would re-run every finished run.
METHOD_NODE = {"propagate": "original", "damping": 1e-6, "update": "none", "alpha": 0.5, "fisher": "rows",
               "iters": 1, "groups": 0, "beta": 0.05, "space": "plain", "solver": "auto"}
ALLOCATION_NODE = {"min_keep": None, "num_layers": "auto", "score": "first_order", "alpha": 1.0}
RESOLVED = {
    "method": {"none": {}, "svd": {}, "asvd": {}, "fwsvd": {}, "svd_llm": {}, "ressvd": {},
               "svd_llm_closed_form": {"name": "svd_llm", "update": "closed_form"}, "adasvd": {"groups": 8}},
    "allocation": {name: {} for name in ("uniform", "adacr", "last_layers", "v2", "global", "erank")},
}


@pytest.mark.parametrize("group", ["method", "allocation"])
def test_resolved_config_is_what_it_was(group):
    base = METHOD_NODE if group == "method" else ALLOCATION_NODE
    choices = sorted(path.stem for path in (CONF / group).glob("*.yaml"))
    assert choices == sorted(RESOLVED[group])
    with initialize_config_dir(config_dir=app.CONFIG_DIR, version_base="1.3"):
        for choice in choices:
            cfg = compose("config", overrides=[*COMPOSED, f"{group}={choice}"])
            node = OmegaConf.to_container(cfg[group], resolve=True)
            expected = {"name": choice, **base, **RESOLVED[group][choice]}
            assert list(node.items()) == list(expected.items()), choice


@pytest.mark.parametrize("group", ["method", "allocation"])
def test_yaml_files_keep_only_what_differs_from_the_defaults(group):
    """One default per option, in its dataclass: a config file sets a name and what it changes, nothing else."""
    for path in sorted((CONF / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        entry = REGISTRIES[group][node.pop("name")]
        defaults = {f.name: f.default for f in dataclasses.fields(entry.options)}
        for key, value in node.items():
            assert key in defaults and value != defaults[key], (path.name, key)


def test_the_methods_read_the_dataclass_default():
    """A method called with options that leave out ``solver`` runs the declared default (auto), not a default of
    its own: the Gram path, not the papers' SVD path."""
    W = torch.randn(16, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    svd = METHODS["svd"].fn
    A, B = svd(W, None, 4, {})
    assert dataclasses.fields(METHODS["svd"].options)[0].default == "auto"
    assert torch.equal(A, svd(W, None, 4, {"solver": "auto"})[0])
    assert not torch.equal(A, svd(W, None, 4, {"solver": "svd"})[0])
    assert ALLOCATIONS["global"].needs_for({}) == {"spectra", "grad"}
    assert ALLOCATIONS["global"].needs_for({"score": "truncation_loss"}) == {"spectra"}


def refused(stderr: str, group: str, name: str, key: str) -> None:
    own = options_of(group, name)
    assert f"{name} has no option {key}" in stderr, stderr[-2000:]
    assert (f"its options: {', '.join(own)}." if own else "it takes no options") in stderr, stderr[-2000:]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("group,name,key", FOREIGN, ids=[f"{g}={n}-{k}" for g, n, k in FOREIGN])
def test_an_option_of_another_method_is_refused_before_any_work(tmp_path, group, name, key):
    value = VALID[group][key]
    proc = run_svdexp([*TINY, f"{group}={name}", f"{group}.{key}={value}"], tmp_path / "run",
                      cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    refused(proc.stderr, group, name, key)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists() and proc.stdout == ""


@pytest.mark.parametrize("group", ["method", "allocation"])
def test_an_option_of_another_method_in_the_composed_config_is_refused(group):
    """The same refusal when the value comes from a config file or the Python API (not the command line)."""
    with initialize_config_dir(config_dir=app.CONFIG_DIR, version_base="1.3"):
        for name in REGISTRIES[group]:
            cfg = compose("config", overrides=[*COMPOSED, f"{group}={name}"])
            validate(cfg)   # its own defaults pass
            for key in sorted(declared(group) - set(options_of(group, name))):
                bad = cfg.copy()
                bad[group][key] = VALID[group][key]
                with pytest.raises(ConfigError) as err:
                    validate(bad)
                refused(str(err.value), group, name, key)


def test_a_sweep_over_methods_refuses_an_option_only_one_has_before_its_first_job(tmp_path):
    sweep_dir = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    proc = run_svdexp(["-m", *TINY, "method=svd_llm,adasvd", "method.groups=0", sweep_dir], cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    refused(proc.stderr, "method", "svd_llm", "groups")
    assert "only; a sweep over several methods sets it in a grid of those that have it" in proc.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "cache").exists()
    proc = run_svdexp(["-m", *TINY, "allocation=glob(*)", "allocation.score=truncation_loss", sweep_dir],
                      cache=tmp_path / "cache")
    assert proc.returncode == 2 and not (tmp_path / "sweep").exists()
    refused(proc.stderr, "allocation", "adacr", "score")


@pytest.mark.parametrize("group,key,value,expected", CASES, ids=[f"{g}.{k}={v}" for g, k, v, _ in CASES])
def test_an_invalid_value_is_refused_naming_the_key(tmp_path, group, key, value, expected):
    proc = run_svdexp([*TINY, f"{group}={owner(group, key)}", f"{group}.{key}={value}"], tmp_path / "run",
                      cache=tmp_path / "cache")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{group}.{key}" in proc.stderr and expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("group", ["method", "allocation"])
def test_a_value_of_the_wrong_type_from_the_python_api_is_refused(group):
    """Without Hydra's typed merge (a plain dict config), validation checks each option's type itself."""
    with initialize_config_dir(config_dir=app.CONFIG_DIR, version_base="1.3"):
        for key in sorted(declared(group)):
            cfg = OmegaConf.to_container(compose("config", overrides=[*COMPOSED, f"{group}={owner(group, key)}"]))
            wrong = "3" if isinstance(VALID[group][key], (int, float)) else 3   # a number as text, or a number
            cfg[group][key] = wrong
            with pytest.raises(ConfigError, match=f"{group}.{key}={wrong!r} is not allowed; choose "):
                validate(OmegaConf.create(cfg))
