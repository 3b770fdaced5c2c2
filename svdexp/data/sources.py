"""Named text sources: the embedded offline sets (``wiki``, ``news``) and hub sets for users with a network.

Every source is a function ``split -> str`` returning the whole split as one string, documents joined
with ``"\\n\\n"`` (the papers' perplexity protocol concatenates the test split that way).
"""

from __future__ import annotations

import bz2
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Callable

from svdexp.errors import ConfigError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the embedded datasets need the 'gensim' package (pip install gensim==4.4.0).")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


@lru_cache(maxsize=None)
def _wiki_articles() -> tuple[str, ...]:
    """The 106 non-redirect articles of gensim's shortened Wikipedia dump, in dump order."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_test_data() / WIKI_DUMP, "rb") as fh:
        for _title, raw, _pageid in extract_pages(fh):
            if not raw or raw.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(raw).strip()
            if text:
                articles.append(text)
    return tuple(articles)


def embedded_wiki(split: str) -> str:
    """WikiText-like text from gensim's Wikipedia sample; article ``i`` is test iff ``i % 5 == 4``."""
    articles = _wiki_articles()
    if split == "test":
        chosen = [a for i, a in enumerate(articles) if i % 5 == 4]
    else:
        chosen = [a for i, a in enumerate(articles) if i % 5 != 4]
    return "\n\n".join(chosen)


def embedded_news(split: str) -> str:
    """News text (gensim's Lee corpus background set); one split only, used for evaluation."""
    lines = (_gensim_test_data() / NEWS_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())


def _hub(path: str, name: str | None, split_names: dict[str, str], field: str,
         data_files: dict[str, str] | None = None) -> Callable[[str], str]:
    def load(split: str) -> str:
        from datasets import load_dataset

        kwargs = {"data_files": {split_names[split]: data_files[split_names[split]]}} if data_files else {}
        ds = load_dataset(path, name, split=split_names[split], **kwargs)
        return "\n\n".join(ds[field])

    load.__doc__ = f"Hub dataset {path} ({name}); needs network access on first use."
    return load


C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}

DATASETS: dict[str, Callable[[str], str]] = {
    "wiki": embedded_wiki,
    "news": embedded_news,
    "wikitext2": _hub("wikitext", "wikitext-2-raw-v1", {"train": "train", "test": "test"}, "text"),
    "ptb": _hub("ptb_text_only", "penn_treebank", {"train": "train", "test": "test"}, "sentence"),
    "c4": _hub("allenai/c4", None, {"train": "train", "test": "validation"}, "text", C4_FILES),
}


def load_text(name: str, split: str) -> str:
    """The text of dataset ``name`` (one of :data:`DATASETS`), ``split`` = ``train`` or ``test``."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; allowed: {', '.join(sorted(DATASETS))}.")
    return DATASETS[name](split)
