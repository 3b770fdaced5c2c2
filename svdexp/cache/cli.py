"""``svdexp-cache``: what ``$SVDEXP_CACHE`` holds, and clearing it.

    svdexp-cache list  [--kind KIND]... [--model NAME_OR_FINGERPRINT] [--older-than DAYS]
    svdexp-cache du    [same filters]
    svdexp-cache clear [same filters] [--dry-run]

Kinds: ``stats`` (calibration statistics), ``svd`` (decompositions), ``models`` (converted GGUF models), ``dense``
(the dense model's perplexity and zero-shot metrics), ``responses`` (lm-eval's answers); any other top-level
folder is a kind of its own name. ``--model`` takes a model name, as runs recorded it next to the weights'
fingerprint (``$SVDEXP_CACHE/models.json``), or a prefix of a fingerprint (4 characters at least).
``--older-than DAYS`` selects entries not used for that long. Every verb works on an empty or missing cache
folder, and none creates it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from svdexp.cache.budget import (ENV_MAX_GB, FOLDER_KINDS, KINDS, RECENT_USE_S, Entry, cache_root, entry_model,
                                 read_model_index, remove_entry, resolve_max_gb, scan)
from svdexp.cache.scratch import clean_scratch


def human(size: float) -> str:
    """Bytes in decimal units (kB, MB, GB: as the budget's)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


class Selection:
    """The entries of a cache folder that match the filters, each with its model (fingerprint, name)."""

    def __init__(self, root: Path, kinds: list[str] | None, model: str | None, older_than: float | None) -> None:
        self.root = root
        self.index = read_model_index(root)
        self.names: dict[str, set[str]] = defaultdict(set)       # name -> fingerprints
        for fingerprint, name in self.index.items():
            self.names[name].add(fingerprint)
        entries = scan(root)
        present = {entry.kind for entry in entries}
        for kind in kinds or ():
            if kind not in KINDS and kind not in present:
                raise SystemExit(f"svdexp-cache: unknown kind {kind!r}; kinds: {', '.join(KINDS)}"
                                 + (f" (and here: {', '.join(sorted(present - set(KINDS)))})"
                                    if present - set(KINDS) else ""))
        if model is not None and not model.strip():
            raise SystemExit("svdexp-cache: --model needs a model name or a fingerprint prefix")
        cutoff = None if older_than is None else time.time() - older_than * 86400
        self.rows: list[tuple[Entry, str | None, str | None]] = []
        for entry in entries:
            if kinds and entry.kind not in kinds:
                continue
            if cutoff is not None and entry.last_use >= cutoff:
                continue
            fingerprint, name = self.model_of(entry)
            if model is not None and not self.matches(model, entry, fingerprint, name):
                continue
            self.rows.append((entry, fingerprint, name))
        self.rows.sort(key=lambda row: (row[0].kind, -row[0].last_use, row[0].key))

    def model_of(self, entry: Entry) -> tuple[str | None, str | None]:
        if entry.folder == "models" and entry.is_dir and not entry.temp:
            return None, entry.key
        fingerprint = entry_model(entry)
        return fingerprint, self.index.get(fingerprint) if fingerprint else None

    def matches(self, wanted: str, entry: Entry, fingerprint: str | None, name: str | None) -> bool:
        if wanted == name:
            return True
        if len(wanted) < 4:
            return False
        prefix = wanted.lower()
        fingerprints = {fingerprint} if fingerprint else set()
        if entry.folder == "models" and name:
            fingerprints |= self.names.get(name, set())
        return any(fp.startswith(prefix) for fp in fingerprints)

    @staticmethod
    def label(fingerprint: str | None, name: str | None) -> str:
        if name and fingerprint:
            return f"{name} ({fingerprint[:12]})"
        return name or (fingerprint[:12] if fingerprint else "-")

    def total(self) -> int:
        return sum(entry.size for entry, _, _ in self.rows)


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def cmd_list(sel: Selection, args) -> int:
    if not sel.rows:
        print(f"no cache entries{_filters(args)} in {sel.root}")
        return 0
    _print_table(("KIND", "MODEL", "SIZE", "LAST USE", "ENTRY"),
                 [(entry.kind + (" (partial)" if entry.temp else ""), sel.label(fp, name), human(entry.size),
                   _when(entry.last_use), entry.name(sel.root)) for entry, fp, name in sel.rows])
    print(f"{len(sel.rows)} entries, {human(sel.total())} in {sel.root}")
    return 0


def _budget_line(root: Path) -> str:
    try:
        gb, source = resolve_max_gb(None)
    except ValueError as err:
        return f"budget: {err}"
    used = sum(entry.size for entry in scan(root))
    where = f"the default, ${ENV_MAX_GB} is not set" if source == "default" else f"${ENV_MAX_GB}"
    return (f"budget: {gb:g} GB ({where}; a run's cache.max_gb overrides it): {human(used)} used "
            f"({100 * used / (gb * 1e9):.1f} %)")


def cmd_du(sel: Selection, args) -> int:
    groups: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for entry, fp, name in sel.rows:
        for bucket in (groups[(entry.kind, sel.label(fp, name))], kinds[entry.kind]):
            bucket[0] += 1
            bucket[1] += entry.size
    rows = []
    for kind in sorted(kinds):
        models = sorted((label, counts) for (k, label), counts in groups.items() if k == kind)
        for label, (count, size) in models:
            rows.append((kind, label, str(count), human(size)))
        if len(models) > 1:
            rows.append((kind, "(all)", str(kinds[kind][0]), human(kinds[kind][1])))
    rows.append(("total", "", str(len(sel.rows)), human(sel.total())))
    _print_table(("KIND", "MODEL", "ENTRIES", "SIZE"), rows)
    print(f"in {sel.root}{_filters(args)}")
    print(_budget_line(sel.root))
    return 0


def cmd_clear(sel: Selection, args) -> int:
    recent = time.time() - RECENT_USE_S
    removed: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    kept = 0
    for entry, fp, name in sel.rows:
        if entry.temp and entry.last_use >= recent:      # a write in progress: its writer renames it soon
            kept += 1
            continue
        if args.dry_run or remove_entry(entry):
            bucket = removed[(entry.kind, sel.label(fp, name))]
            bucket[0] += 1
            bucket[1] += entry.size
    verb = "would remove" if args.dry_run else "removed"
    count = sum(n for n, _ in removed.values())
    size = sum(s for _, s in removed.values())
    for (kind, label), (n, s) in sorted(removed.items()):
        print(f"{verb} {n} {kind} entries of {label}: {human(s)}")
    print(f"{verb} {count} entries, {human(size)}{_filters(args)} from {sel.root}"
          + (f"; kept {kept} files being written" if kept else ""))
    leftovers = clean_scratch(dry_run=args.dry_run)       # activation files of killed runs (calib.activations=disk)
    if leftovers:
        print(f"{verb} {len(leftovers)} activation files of runs that are gone: "
              f"{human(sum(size for _, size in leftovers))}")
    return 0


def _filters(args) -> str:
    parts = []
    if args.kind:
        parts.append("kind " + ", ".join(args.kind))
    if args.model:
        parts.append(f"model {args.model}")
    if args.older_than is not None:
        parts.append(f"unused for {args.older_than:g} days")
    return f" ({'; '.join(parts)})" if parts else ""


def _days(value: str) -> float:
    days = float(value)
    if not days >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days >= 0")
    return days


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    dir_help = "the cache folder (default: $SVDEXP_CACHE, else ~/.cache/svdexp)"
    common.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=dir_help)
    common.add_argument("--kind", action="append", default=None, metavar="KIND",
                        help=f"only this kind ({', '.join(KINDS)}); repeatable")
    common.add_argument("--model", default=None, metavar="NAME_OR_FINGERPRINT",
                        help="only this model: its name (as in the run's model.name) or a fingerprint prefix")
    common.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                        help="only entries not used for DAYS days")
    top = argparse.ArgumentParser(
        prog="svdexp-cache", description="List, measure and clear svdexp's cache ($SVDEXP_CACHE).",
        epilog=f"Folders and kinds: {', '.join(f'{f} -> {k}' for f, k in FOLDER_KINDS.items())}. The size budget "
               f"is cache.max_gb, else ${ENV_MAX_GB}, else 20 GB; runs evict least recently used entries.")
    top.add_argument("--dir", type=Path, default=None, help=dir_help)
    verbs = top.add_subparsers(dest="verb", required=True, metavar="{list,du,clear}")
    verbs.add_parser("list", parents=[common], help="every entry: kind, model, size, last use")
    verbs.add_parser("du", parents=[common], help="sizes per kind and model, and the budget")
    clear = verbs.add_parser("clear", parents=[common], help="remove the entries selected (all without filters)")
    clear.add_argument("--dry-run", action="store_true", help="show what would be removed, remove nothing")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    root = args.dir if args.dir is not None else cache_root()
    try:
        sel = Selection(root.expanduser(), args.kind, args.model, args.older_than)
        return {"list": cmd_list, "du": cmd_du, "clear": cmd_clear}[args.verb](sel, args)
    except BrokenPipeError:     # `svdexp-cache list | head`
        sys.stderr.close()
        return 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
