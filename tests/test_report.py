"""svdexp-report on hand-written sweep directories: tables, published numbers, CSV, plot, CLI and Hydra callback."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from svdexp.errors import ConfigError
from svdexp.report.frame import ReportCallback, build_report, main, make_label, scan, write_report

ROOT = Path(__file__).resolve().parents[1]
METHOD_DEFAULTS = {"propagate": "original", "damping": 1e-6, "update": "none", "alpha": 0.5, "fisher": "rows",
                   "iters": 1, "groups": 0, "beta": 0.05, "space": "plain"}


def result(model: str, method: str, ratio: float, ppl: dict, *, allocation: str = "uniform", mean_acc=None,
           sweep: dict | None = None, status: str = "done", seconds: float = 12.5, **options) -> dict:
    """A results.json as the runner writes it (only the fields the report reads, plus a few others)."""
    method_cfg = {**METHOD_DEFAULTS, "name": method, **({"groups": 8} if method == "adasvd" else {}),
                  **{k: v for k, v in options.items() if k in METHOD_DEFAULTS}}
    alloc_cfg = {"name": allocation, "min_keep": None, "num_layers": options.get("num_layers", "auto")}
    config = {"model": {"name": model}, "method": method_cfg, "allocation": alloc_cfg,
              "calib": {"dataset": "wiki", "num_samples": 32, "seq_len": 512, "batch_size": 8},
              "eval": {"ppl": {"datasets": list(ppl), "seq_len": 512, "max_chunks": 64, "batch_size": 8}},
              "logger": {"name": "none", "mode": "disabled"}, "ratio": ratio, "seed": 0, "device": "cpu",
              "dtype": "float32", "tags": []}
    if sweep is not None:
        config["sweep"] = sweep
    metrics: dict = {"ppl": ppl}
    if mean_acc is not None:
        metrics["zeroshot"] = {"arc_easy_embedded": {"acc": mean_acc, "acc_norm": mean_acc}, "mean_acc": mean_acc}
    return {"status": status, "config": config, "model": {"name": model, "params_total": 1000},
            "compression": {"method": method, "allocation": allocation, "target_ratio": ratio,
                            "achieved_ratio_targeted": ratio + 0.0004, "achieved_ratio_model": ratio * 0.75,
                            "weight_bytes": 4000, "seconds": seconds},
            "metrics": metrics}


def put(root: Path, rel: str, data: dict | str, mtime: float = 1_700_000_000.0) -> Path:
    """Write ``data`` as ``root/rel/results.json`` (a string verbatim) with a given modification time."""
    path = root / rel / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def smol_sweep(tmp_path: Path) -> Path:
    """smollm2 runs of several methods x ratios, named after SVD-LLM's Table 1, with broken and duplicate jobs."""
    root = tmp_path / "svd_llm_table1"
    sw = {"name": "svd_llm_table1", "paper_table": "svd_llm_table1"}
    m = "smollm2_135m"
    put(root, "method=none,ratio=0.0", result(m, "none", 0.0, {"wiki": 24.2, "news": 29.74}, sweep=sw, seconds=0))
    put(root, "a/method=svd,ratio=0.2", result(m, "svd", 0.2, {"wiki": 1234.4, "news": 2000.25}, sweep=sw))
    put(root, "a/b/method=svd,ratio=0.4", result(m, "svd", 0.4, {"wiki": "inf", "news": "nan"}, sweep=sw))
    put(root, "svd_llm_0.2_old", result(m, "svd_llm", 0.2, {"wiki": 99.9, "news": 99.9}, sweep=sw),
        mtime=1_600_000_000.0)
    put(root, "svd_llm_0.2_new", result(m, "svd_llm", 0.2, {"wiki": 31.2, "news": 40.1}, mean_acc=0.5, sweep=sw,
                                        seconds=33.0))
    put(root, "svd_llm_0.4", result(m, "svd_llm", 0.4, {"wiki": 55.5, "news": 70.25}, sweep=sw))
    put(root, "cf_0.2", result(m, "svd_llm", 0.2, {"wiki": 30.1, "news": 39.0}, update="closed_form", sweep=sw))
    put(root, "ada_0.4", result(m, "adasvd", 0.4, {"wiki": 50.0, "news": 60.0}, allocation="adacr", sweep=sw))
    put(root, "res_0.4", result(m, "ressvd", 0.4, {"wiki": 45.0, "news": 58.0}, allocation="last_layers",
                                num_layers=10, sweep=sw))
    put(root, "asvd_0.2", result(m, "asvd", 0.2, {"wiki": 40.0, "news": 50.0}, alpha=0.25, sweep=sw))
    put(root, "running", result(m, "fwsvd", 0.2, {"wiki": 1.0}, status="running", sweep=sw))
    put(root, "corrupt", '{"status": "done", "config": ')
    put(root, "svd_llm_0.4/.hydra", result(m, "fwsvd", 0.4, {"wiki": 2.0, "news": 2.0}, sweep=sw))  # skipped
    (root / "crashed" / ".hydra").mkdir(parents=True)                                              # no results
    return root


def md_table(md: str, heading: str) -> dict[str, dict[str, str]]:
    """The first Markdown table after the line ``heading``: {row label: {column: cell}}."""
    lines = md.splitlines()
    i = lines.index(heading)
    while not lines[i].startswith("|"):
        i += 1
    header = [c.strip() for c in lines[i].strip("|").split(" | ")]
    rows = {}
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_labels():
    assert make_label("svd_llm") == "SVD-LLM"
    assert make_label("svd_llm", "closed_form") == "SVD-LLM (closed-form update)"
    assert make_label("svd_llm", allocation="adacr") == "SVD-LLM + adaCR"
    assert make_label("ressvd", allocation="last_layers") == "ResSVD + last-layers"
    assert make_label("none") == "Dense"
    assert make_label("asvd", extras=["alpha=0.25"]) == "ASVD [alpha=0.25]"


def test_markdown_rows_cells_and_notes(smol_sweep: Path):
    report = build_report(smol_sweep)
    assert report.sweep_name == "svd_llm_table1" and report.num_jobs == 10
    assert sorted(why for _, why in report.incomplete) == ["no results.json", "not valid JSON", "status 'running'"]
    md = report.markdown()
    rows = md_table(md, "## smollm2_135m")
    assert list(rows) == ["Dense", "SVD", "ASVD [alpha=0.25]", "SVD-LLM", "SVD-LLM (closed-form update)",
                          "AdaSVD + adaCR", "ResSVD + last-layers [K=10]"]
    assert list(rows["Dense"])[1:] == ["0 % wiki", "0 % news", "0 % acc", "20 % wiki", "20 % news", "20 % acc",
                                       "40 % wiki", "40 % news", "40 % acc"]
    assert rows["Dense"]["0 % wiki"] == "24.20" and rows["Dense"]["0 % news"] == "29.74"
    assert rows["Dense"]["20 % wiki"] == "–"                      # the dense model is shown once
    assert rows["SVD-LLM"]["20 % wiki"] == "31.20"                # the newest duplicate, not 99.90
    assert rows["SVD-LLM"]["20 % acc"] == "0.500"
    assert rows["SVD-LLM"]["40 % news"] == "70.25"
    assert rows["SVD-LLM (closed-form update)"]["20 % news"] == "39.00"
    assert rows["SVD"]["20 % wiki"] == "1234"
    assert rows["SVD"]["40 % wiki"] == "inf" and rows["SVD"]["40 % news"] == "nan"
    assert rows["AdaSVD + adaCR"]["40 % wiki"] == "50.00" and rows["AdaSVD + adaCR"]["20 % wiki"] == "–"
    assert "99.90" not in md and "FWSVD" not in rows               # older duplicate, incomplete and .hydra jobs
    assert "used the newest (`svd_llm_0.2_new/results.json`), ignored `svd_llm_0.2_old/results.json`" in md
    assert "Incomplete jobs (3)" in md and "`corrupt/results.json` (not valid JSON)" in md
    assert "non-finite perplexity on wiki, news" in md
    assert "Achieved ratio (targeted matrices / whole model): 20 % → 0.200 / 0.150" in md


def test_scan_frame(smol_sweep: Path):
    """benchmarks/frontier.py reads the jobs' config and path from scan's frame."""
    frame, incomplete = scan(smol_sweep)
    assert len(frame) == 10 and len(incomplete) == 3
    assert {"config", "path", "row", "target_ratio", "ppl_wiki", "ppl_news", "mean_acc"} <= set(frame.columns)
    svd = frame[frame["path"] == smol_sweep / "a/b/method=svd,ratio=0.4/results.json"].iloc[0]
    assert svd["config"]["method"]["name"] == "svd" and svd["ppl_news"] != svd["ppl_news"]   # a measured nan
    assert frame.loc[frame["row"] == "Dense", "ppl_wiki"].tolist() == [24.2]


def test_published_table_below_for_another_model(smol_sweep: Path):
    md = build_report(smol_sweep).markdown()
    heading = ("### Published (LLaMA-7B, WikiText-2 / C4) — a different model from this sweep's smollm2_135m; "
               "compare orderings, not values")
    paper = md_table(md, heading)
    assert paper["SVD-LLM (whitening only)"]["Ours"] == "SVD-LLM"
    assert paper["SVD-LLM (whitening only)"]["20 % WikiText-2"] == "7.94"
    assert paper["SVD-LLM (whitening only)"]["80 % C4"] == "6224"
    assert paper["SVD-LLM (whitening only)"]["40 % acc"] == "0.38"
    assert paper["Dense"]["0 % C4"] == "7.34"
    assert paper["SVD-LLM (with LoRA update)"]["Ours"] == "–"
    assert paper["FWSVD"]["Ours"] == "–"                          # its only job is incomplete
    assert "SVD-LLM (with LoRA update): the LoRA update is training: out of scope" in md
    assert " / 7.94" not in md                                    # never side by side with another model


def test_published_side_by_side_for_the_papers_model(tmp_path: Path):
    root = tmp_path / "llama"
    sw = {"name": "svd_llm_table1", "paper_table": "svd_llm_table1"}
    put(root, "dense", result("llama_7b", "none", 0.0, {"wikitext2": 5.70, "c4": 7.40}, mean_acc=0.571, sweep=sw))
    put(root, "s20", result("llama_7b", "svd_llm", 0.2, {"wikitext2": 8.5, "c4": 16.0}, mean_acc=0.48, sweep=sw))
    put(root, "c20", result("llama_7b", "svd_llm", 0.2, {"wikitext2": 8.1, "c4": 14.0}, update="closed_form",
                            sweep=sw))
    md = build_report(root).markdown()
    assert "Each cell is **ours / paper**" in md and "### Published" not in md
    rows = md_table(md, "## llama_7b")
    assert rows["SVD-LLM"]["20 % WikiText-2"] == "8.50 / 7.94"
    assert rows["SVD-LLM"]["20 % C4"] == "16.00 / 15.84"
    assert rows["SVD-LLM"]["20 % acc"] == "0.480 / 0.49"
    assert rows["SVD-LLM"]["40 % WikiText-2"] == "– / 13.73"       # the paper's ratios we did not run
    assert rows["Dense"]["0 % WikiText-2"] == "5.70 / 5.68"
    assert rows["SVD-LLM (closed-form update)"]["20 % WikiText-2"] == "8.10 / –"   # no published counterpart
    assert rows["SVD-LLM (with LoRA update) (paper only)"]["20 % WikiText-2"] == "– / 7.73"
    assert rows["ASVD (paper only)"]["40 % C4"] == "– / 1109"
    assert "Our perplexity: chunks of 512 tokens, first 64 chunks" in md


def test_adasvd_table_side_by_side_with_caveat(tmp_path: Path):
    root = tmp_path / "ada"
    sw = {"name": "adasvd_table1", "paper_table": "adasvd_table1"}
    ppl = {"wikitext2": 15.0, "ptb": 300.0, "c4": 55.0}
    put(root, "a", result("llama2_7b", "adasvd", 0.4, ppl, allocation="adacr", sweep=sw))
    md = build_report(root).markdown()
    rows = md_table(md, "## llama2_7b")
    assert rows["AdaSVD + adaCR"]["40 % PTB"] == "300.00 / 304.62"
    assert rows["SVD-LLM (paper only)"]["60 % C4"] == "– / 561.00"
    assert "dense perplexities are LLaMA-1's" in md


def test_sweep_name_from_directory_without_sweep_config(tmp_path: Path):
    root = tmp_path / "my_sweep"
    put(root, "j", result("smollm2_135m", "svd", 0.2, {"wiki": 100.0}))
    report = build_report(root)
    assert report.sweep_name == "my_sweep" and report.paper_table is None
    assert "Published" not in report.markdown()


def test_option_collisions_get_distinct_labels(tmp_path: Path):
    root = tmp_path / "s"
    put(root, "a", result("smollm2_135m", "svd_llm", 0.2, {"wiki": 30.0}))
    put(root, "b", result("smollm2_135m", "svd_llm", 0.2, {"wiki": 32.0}, propagate="compressed"))
    seed = result("smollm2_135m", "svd_llm", 0.2, {"wiki": 33.0})
    seed["config"]["seed"] = 1
    put(root, "c", seed)
    rows = md_table(build_report(root).markdown(), "## smollm2_135m")
    assert rows["SVD-LLM [seed=0]"]["20 % wiki"] == "30.00"
    assert rows["SVD-LLM [seed=1]"]["20 % wiki"] == "33.00"
    assert rows["SVD-LLM [propagate=compressed]"]["20 % wiki"] == "32.00"


def test_files_csv_and_png(smol_sweep: Path, tmp_path: Path):
    out = tmp_path / "out"
    paths = write_report(smol_sweep, out)
    assert [p.name for p in paths] == ["report.md", "report.tex", "report.csv", "ppl_vs_ratio.png"]
    assert all(p.parent == out and p.stat().st_size > 0 for p in paths)
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tex = paths[1].read_text()
    assert "\\multicolumn{3}{c}{20 \\%}" in tex and "ResSVD + last-layers [K=10]" in tex
    with open(paths[2], newline="") as fh:
        records = list(csv.DictReader(fh))
    ours = {(r["row"], r["target_ratio"]): r for r in records if r["source"] == "ours"}
    assert ours[("SVD", "0.4")]["ppl_wiki"] == "inf" and ours[("SVD", "0.4")]["ppl_news"] == "nan"
    assert ours[("SVD-LLM", "0.2")]["seconds"] == "33.0"
    assert ours[("SVD-LLM", "0.2")]["duplicates_ignored"] == "1"
    assert ours[("SVD-LLM", "0.2")]["counterpart"] == "SVD-LLM (whitening only)"
    assert ours[("Dense", "0.0")]["ppl_wiki"] == "24.2"
    paper = [r for r in records if r["source"] == "paper:svd_llm_table1"]
    lora = next(r for r in paper if r["row"] == "SVD-LLM (with LoRA update)" and r["target_ratio"] == "0.8")
    assert lora["ppl_wikitext2"] == "31.79" and lora["ppl_c4"] == "43.71" and lora["model"] == "llama_7b"


def test_cli(smol_sweep: Path, tmp_path: Path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) != 0
    assert "no completed job" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) != 0
    assert "does not exist" in capsys.readouterr().err
    assert main([str(smol_sweep), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^\| SVD-LLM +\| ", printed, re.M) and str(tmp_path / "o" / "report.md") in printed
    assert 'svdexp-report = "svdexp.report.frame:main"' in (ROOT / "pyproject.toml").read_text()


def test_empty_sweep_raises(tmp_path: Path):
    put(tmp_path, "x", '{"status": "running"}')
    with pytest.raises(ConfigError, match="1 incomplete"):
        build_report(tmp_path)


def test_hydra_callback_writes_report_and_wandb_table(smol_sweep: Path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(smol_sweep)}},
                            "logger": {"name": "wandb", "mode": "offline", "project": "svdexp", "entity": None}})
    ReportCallback().on_multirun_end(cfg)
    assert (smol_sweep / "report.md").is_file() and (smol_sweep / "ppl_vs_ratio.png").is_file()
    tables = list((smol_sweep / "wandb").glob("offline-run-*/files/media/table/report_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert "row" in table["columns"] and any("SVD-LLM (closed-form update)" in r for r in table["data"])


def test_hydra_callback_never_raises(tmp_path: Path, caplog):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nowhere")}}, "logger": {"name": "none"}})
    with caplog.at_level(logging.WARNING, logger="svdexp.report"):
        ReportCallback().on_multirun_end(cfg)
    assert "no report for this sweep" in caplog.text


HYDRA_APP = '''
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path=".", config_name="cfg")
def task(cfg):
    ratio = float(cfg.ratio)
    ppl = {"wiki": 20.0 + 100 * ratio + (5.0 if cfg.method == "svd" else 0.0)}
    results = {"status": "done", "model": {"name": "m"},
               "config": {"model": {"name": "m"}, "method": {"name": cfg.method}, "ratio": ratio},
               "compression": {"method": cfg.method, "allocation": "uniform", "target_ratio": ratio},
               "metrics": {"ppl": ppl}}
    (Path(HydraConfig.get().runtime.output_dir) / "results.json").write_text(json.dumps(results))


task()
'''

HYDRA_CFG = '''
method: svd
ratio: 0.2
logger: {name: none, mode: disabled}
hydra:
  sweep:
    dir: SWEEP_ROOT/${now:%H-%M-%S}
    subdir: ${hydra:job.override_dirname}
  callbacks:
    report:
      _target_: svdexp.report.frame.ReportCallback
'''


@pytest.mark.integration
def test_hydra_multirun_runs_the_callback(tmp_path: Path):
    """A real Hydra multirun with the callback registered leaves a report in its (interpolated) sweep dir."""
    (tmp_path / "app.py").write_text(HYDRA_APP)
    (tmp_path / "cfg.yaml").write_text(HYDRA_CFG.replace("SWEEP_ROOT", str(tmp_path / "multirun")))
    proc = subprocess.run([sys.executable, "app.py", "-m", "method=svd,svd_llm", "ratio=0.2,0.4"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports = list((tmp_path / "multirun").glob("*/report.md"))
    assert len(reports) == 1, proc.stderr[-2000:]
    rows = md_table(reports[0].read_text(), "## m")
    assert rows["SVD"]["40 % wiki"] == "65.00" and rows["SVD-LLM"]["20 % wiki"] == "40.00"
    assert (reports[0].parent / "ppl_vs_ratio.png").is_file()


# ----------------------------------------------------------------------------------------------- golden files
# tests/fixtures/report/sweeps/<name>: sweep directories as the runner leaves them (every section kind: our
# datasets with the paper's table below, the paper's model side by side, three-dataset side by side with a dense
# row from eval.dense_baseline, no paper table; duplicates, non-finite values, incomplete jobs, option labels).
# golden/<name>/report.{md,tex,csv}: what svdexp-report wrote for them before the pandas rewrite. The tests compare
# cells (and every non-table line), not whitespace. SVDEXP_UPDATE_GOLDEN=1 rewrites the golden files.
FIXTURES = ROOT / "tests" / "fixtures" / "report"
GOLDEN = ("mixed", "ada", "plain")


def fixture_sweep(name: str, tmp_path: Path) -> Path:
    """A copy of a fixture sweep, every results.json with the mtime of mtimes.json (default 1_700_000_000)."""
    root = tmp_path / name
    shutil.copytree(FIXTURES / "sweeps" / name, root)
    mtimes = json.loads((FIXTURES / "mtimes.json").read_text())
    for path in root.rglob("results.json"):
        mtime = mtimes.get(f"{name}/{path.relative_to(root).as_posix()}", 1_700_000_000.0)
        os.utime(path, (mtime, mtime))
    return root


def md_blocks(md: str) -> list:
    """Markdown as blocks: each table as rows of cell strings (separator row dropped), other lines stripped."""
    blocks: list = []
    for line in md.splitlines():
        if not line.startswith("|"):
            blocks.append(line.strip())
        elif not re.fullmatch(r"\|[\s:|-]+\|", line.strip()):
            row = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not blocks or not isinstance(blocks[-1], list):
                blocks.append([])
            blocks[-1].append(row)
    return blocks


def tex_tables(tex: str) -> list[dict]:
    """Every tabular: its column spec, caption and rows as cell strings (rule lines kept as they are)."""
    tables = []
    for env in re.findall(r"\\begin\{table\}.*?\\end\{table\}", tex, re.S):
        body = re.search(r"\\begin\{tabular\}\{([^}]*)\}\n(.*?)\\end\{tabular\}", env, re.S)
        rows = [[c.strip() for c in re.split(r"(?<!\\)&", line.strip()[:-2])] if line.strip().endswith("\\\\")
                else line.strip() for line in body.group(2).splitlines() if line.strip()]
        caption = re.search(r"\\caption\{(.*)\}\s*$", env, re.M)
        tables.append({"columns": body.group(1), "caption": caption and caption.group(1), "rows": rows})
    return tables


def assert_well_formed_latex(tex: str) -> None:
    """Balanced \\begin/\\end; every row of every tabular spans exactly its columns."""
    stack = []
    for kind, env in re.findall(r"\\(begin|end)\{(\w+)\}", tex):
        if kind == "begin":
            stack.append(env)
        else:
            assert stack and stack.pop() == env, f"\\end{{{env}}} closes nothing"
    assert not stack, f"unclosed: {stack}"
    for table in tex_tables(tex):
        ncols = len(re.findall(r"[lrc]", table["columns"]))
        rows = [r for r in table["rows"] if isinstance(r, list)]
        assert len(rows) >= 3                                        # two header rows and data
        for row in rows[:2]:                                         # headers: \multicolumn spans add up
            spans = [int(m.group(1)) if (m := re.match(r"\\multicolumn\{(\d+)\}", c)) else 1 for c in row]
            assert sum(spans) == ncols, row
        for row in rows[2:]:
            assert len(row) == ncols, row                            # i.e. exactly ncols - 1 "&"


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_outputs(name: str, tmp_path: Path):
    sweep = fixture_sweep(name, tmp_path)
    out = tmp_path / "out"
    md_path, tex_path, csv_path, png = write_report(sweep, out)
    md = md_path.read_text(encoding="utf-8").replace(str(sweep), "<SWEEP_DIR>")
    tex, csv_text = tex_path.read_text(encoding="utf-8"), csv_path.read_text(encoding="utf-8")
    golden = FIXTURES / "golden" / name
    if os.environ.get("SVDEXP_UPDATE_GOLDEN"):
        for file, text in (("report.md", md), ("report.tex", tex), ("report.csv", csv_text)):
            (golden / file).write_text(text, encoding="utf-8")
    assert md_blocks(md) == md_blocks((golden / "report.md").read_text(encoding="utf-8"))
    assert tex.splitlines()[0] == (golden / "report.tex").read_text(encoding="utf-8").splitlines()[0]
    assert tex_tables(tex) == tex_tables((golden / "report.tex").read_text(encoding="utf-8"))
    assert_well_formed_latex(tex)
    with open(golden / "report.csv", newline="", encoding="utf-8") as fh:
        expected = list(csv.reader(fh))
    assert list(csv.reader(csv_text.splitlines())) == expected
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_golden_fixtures_cover_every_section_kind(tmp_path: Path):
    """The fixtures exercise what the golden files are meant to pin down."""
    reports = {name: build_report(fixture_sweep(name, tmp_path)) for name in GOLDEN}
    modes = {s.mode for r in reports.values() for s in r.sections}
    assert modes == {"side", "below", None}
    md = "".join(r.markdown() for r in reports.values())
    for needle in ("(paper only)", "non-finite perplexity", "used the newest", "Dense row: the dense baseline",
                   "Jobs disagree on the sweep", "has no published data", "[seed=0]", "[K=10]", " / ", " acc "):
        assert needle in md, needle
