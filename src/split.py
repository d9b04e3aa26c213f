"""Stage `split`: check every image once and write the train/val/test manifest.

Each file in data/raw is decoded; the ones that can't be used (broken, not an allowed format,
over data.max_pixels) are listed with the reason in metrics/data_report.json and left out.
Decoding results are cached by content hash (.dvc/tmp/image_checks.json), so rerunning the
split, e.g. with other ratios, decodes nothing.

The split is stratified per class and seeded, and it depends only on file contents: a file's
place is decided by a hash of (seed, content), so listing order, machine, and images added to
other classes change nothing. Identical files always share a split (no leakage); identical
files filed under two different classes are left out as ambiguous. A folder already split into
train/ and val/ (and optionally test/) keeps its split; without val/, val is taken from train/.
"""
import csv
import functools
import hashlib
import io
import json
import os
import unicodedata
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import PIL

from src.core import process
from src.core.errors import UserError
from src.core.files import write_json, write_text
from src.core.params import load_params
from src.core.paths import DATA_REPORT, INGEST_RECORD, MANIFEST, RAW, RAW_NOTE, hidden, workspace_root
from src.core.process import run_stage
from src.data.images import PixelBudget, check_image, file_digest, skip_reason_for_name

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
SPLITS = ("train", "val", "test")
RARE = 0.01  # a file format below this share of the images is listed in the report: worth a look


def find_files(raw):
    """([(path, class, split or None)] of candidate images, [(path, reason)] of ignored files, layout)."""
    top_dirs = [p.name for p in raw.iterdir() if p.is_dir() and not hidden(p.name)]
    names = {SPLIT_DIRS.get(name.lower()) for name in top_dirs}
    presplit = bool(top_dirs) and None not in names and "train" in names
    found, ignored = [], []
    for f in sorted(p for p in raw.rglob("*") if p.is_file()):
        parts = f.relative_to(raw).parts
        if parts in ((INGEST_RECORD.name,), (RAW_NOTE.name,)):
            continue
        split = SPLIT_DIRS[parts[0].lower()] if presplit and len(parts) > 1 else None
        inner = parts[1:] if split else parts  # class/[nested folders/]name
        if any(hidden(part) for part in parts[:-1]):
            reason = "inside a hidden folder; ignored"
        elif len(inner) < 2:
            reason = skip_reason_for_name(f) or "not inside a class folder; ignored"
        else:
            reason = skip_reason_for_name(f)
        if reason:
            ignored.append((f, reason))
        else:  # one label per class whatever the filesystem's Unicode form (macOS writes NFD)
            found.append((f, unicodedata.normalize("NFC", inner[0]), split))
    return found, ignored, ("pre-split" if presplit else "class folders")


def class_folders(raw):
    """Every class folder in data/raw (under train/, val/, test/ when pre-split), as paths."""
    tops = [p for p in sorted(raw.iterdir()) if p.is_dir() and not hidden(p.name)]
    if tops and all(SPLIT_DIRS.get(p.name.lower()) for p in tops) and any(
            SPLIT_DIRS[p.name.lower()] == "train" for p in tops):
        return [c for top in tops for c in sorted(top.iterdir()) if c.is_dir() and not hidden(c.name)]
    return tops


def unused_class_folders(raw, rows):
    """Class folders that give no image to the manifest, each with why: empty, or all files skipped."""
    used = {Path(r["path"]).relative_to(raw).parts[:2] for r in rows}
    unused = []
    for folder in class_folders(raw):
        parts = folder.relative_to(raw).parts
        if not any(key[:len(parts)] == parts for key in used):
            n = sum(1 for f in folder.rglob("*") if f.is_file())
            unused.append({"path": folder.as_posix(),
                           "reason": f"no usable images ({n} files, all skipped or conflicting)" if n else "no files"})
    return unused


def not_ingested(raw):
    """What ingest left out of data.source (links, hidden files), from its record: [{path, reason}]."""
    try:
        left_out = json.loads((raw / INGEST_RECORD.name).read_text(encoding="utf-8"))["skipped"]
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a data/raw that ingest did not write
    return left_out if isinstance(left_out, list) else []


def cache_path():
    """Under the real project's .dvc/tmp (git-ignored scratch), also from a `dvc exp --temp` copy."""
    root = workspace_root()
    return root / ".dvc" / "tmp" / "image_checks.json" if (root / ".dvc").is_dir() else None


def cache_key(budget):
    """What a cached check depends on besides the file's content: Pillow's version and the pixel budget."""
    return {"pillow": PIL.__version__, "max_pixels": budget.pixels}


def load_cache(path, budget):
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        return cached["checks"] if {k: cached.get(k) for k in cache_key(budget)} == cache_key(budget) else {}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return {}  # absent or unreadable: everything is decoded again


def check_images(paths, budget):
    """{path: (sha256, problem or None, format)}; each distinct content is decoded at most once, ever
    (for one pixel budget: an image over it is a problem)."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        digests = dict(zip(paths, pool.map(file_digest, paths)))  # hashing releases the GIL
    cache = cache_path()
    known = load_cache(cache, budget) if cache else {}
    todo = {}
    for path, digest in digests.items():
        if digest not in known:
            todo.setdefault(digest, path)
    if todo:
        with ProcessPoolExecutor() as pool:
            known.update(zip(todo, pool.map(functools.partial(check_image, budget=budget), todo.values(),
                                            chunksize=16)))
        if cache:
            write_json(cache, {**cache_key(budget), "checks": known})
    print(f"split: checked {len(paths)} images ({len(todo)} decoded, the rest known by content hash)")
    return {p: (d, *known[d]) for p, d in digests.items()}


def rank(seed, digest):
    return hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()


def split_class(digests, ratios, seed):
    """Assign each distinct content of one class to a split: {digest: split}, or None if too few."""
    ordered = sorted(set(digests), key=lambda d: rank(seed, d))
    counts = {s: (max(1, round(len(ordered) * r)) if r > 0 else 0) for s, r in ratios.items()}
    if len(ordered) - counts["val"] - counts["test"] < 1:
        return None
    n_test, n_val = counts["test"], counts["val"]
    return {d: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, d in enumerate(ordered)}


def assign(rows, ratios, seed):
    """Set row['split'] for rows of any classes from their contents; refuse classes too small."""
    by_class = defaultdict(list)
    for r in rows:
        by_class[r["label"]].append(r["sha256"])
    assignment, too_small = {}, []
    for name in sorted(by_class):
        result = split_class(by_class[name], ratios, seed)
        if result is None:
            too_small.append(f"'{name}' ({len(set(by_class[name]))})")
        else:
            assignment.update(result)
    if too_small:
        need = 1 + sum(r > 0 for r in ratios.values())
        raise UserError(
            f"class {', '.join(too_small)} has too few distinct images for data.val={ratios['val']} and "
            f"data.test={ratios['test']}: every non-zero split takes at least one image per class, so a class "
            f"needs {need}; add images or lower the ratios (0 turns a split off)")
    for r in rows:
        r["split"] = assignment[r["sha256"]]


def build_manifest(files, seed, ratios):
    """(manifest rows, digests filed under several classes, rows moved to an earlier given split)."""
    by_digest_classes = defaultdict(set)
    for f in files:
        by_digest_classes[f["sha256"]].add(f["label"])
    conflicting = {d for d, classes in by_digest_classes.items() if len(classes) > 1}
    kept = [f for f in files if f["sha256"] not in conflicting]
    moved = []
    if any(f["split"] for f in kept):
        # Pre-split: keep it, except that a copy of content already in an earlier split joins it.
        first_split = {}
        for f in sorted(kept, key=lambda f: SPLITS.index(f["split"])):
            first_split.setdefault(f["sha256"], f["split"])
        for f in kept:
            if f["split"] != first_split[f["sha256"]]:
                moved.append(f"{f['path']} ({f['split']} -> {first_split[f['sha256']]})")
                f["split"] = first_split[f["sha256"]]
        missing = sorted({f["label"] for f in kept} - {f["label"] for f in kept if f["split"] == "train"})
        if missing:
            raise UserError(f"class(es) {missing} have no images under train/; a pre-split folder needs every "
                            f"class in train/")
        if not any(f["split"] == "val" for f in kept):  # train/ [test/] only: val comes out of train/
            assign([f for f in kept if f["split"] == "train"], {"val": ratios["val"], "test": 0}, seed)
    else:
        assign(kept, ratios, seed)
    return kept, conflicting, moved


IMBALANCE_WARNING = 3  # the largest class has at least this many times the smallest's images


def class_imbalance(per_class):
    """Largest and smallest class by image count, all splits together, and their ratio."""
    totals = {c: sum(counts.values()) for c, counts in per_class.items()}
    largest, smallest = max(totals, key=totals.get), min(totals, key=totals.get)
    return {"largest": largest, "smallest": smallest,
            "ratio": round(totals[largest] / max(1, totals[smallest]), 2)}


def main():
    process.start()
    params = load_params()
    if not RAW.is_dir():
        raise UserError(f"{RAW} not found: run `dvc repro ingest` first")
    found, ignored, layout = find_files(RAW)
    budget = PixelBudget(params["data"]["max_pixels"], "data.max_pixels in params.yaml")
    checked = check_images([f for f, _, _ in found], budget)
    skipped = [{"path": p.as_posix(), "reason": reason} for p, reason in ignored]
    files, formats = [], {}
    for path, label, split in found:
        digest, problem, fmt = checked[path]
        if problem:
            skipped.append({"path": path.as_posix(), "reason": problem})
        else:
            files.append({"path": path.as_posix(), "label": label, "split": split, "sha256": digest})
            formats[path.as_posix()] = fmt

    ratios = {"val": params["data"]["val"], "test": params["data"]["test"]}
    labels = sorted({f["label"] for f in files})
    if len(labels) < 2:
        raise UserError(f"{RAW} holds {len(labels)} class(es) with usable images {labels}; a classifier needs at "
                        f"least 2 class sub-folders of images (check data.source={params['data']['source']!r} "
                        f"and the skipped files in {DATA_REPORT})")
    rows, conflicting, moved = build_manifest(files, params["seed"], ratios)
    classes = sorted({r["label"] for r in rows})
    rows.sort(key=lambda r: (r["split"], r["label"], r["path"]))

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "label", "split", "sha256"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(MANIFEST, buf.getvalue())

    by_digest = defaultdict(list)
    for f in files:
        by_digest[f["sha256"]].append(f["path"])
    format_counts = defaultdict(int)
    for r in rows:
        format_counts[formats[r["path"]]] += 1
    per_class = {c: {s: 0 for s in SPLITS} for c in classes}
    for r in rows:
        per_class[r["label"]][r["split"]] += 1
    report = {
        "dataset_digest": hashlib.sha256(buf.getvalue().encode()).hexdigest(),
        "layout": layout,
        "num_classes": len(classes),
        "images": {s: sum(1 for r in rows if r["split"] == s) for s in SPLITS},
        "per_class": per_class,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "not_ingested": not_ingested(RAW),  # paths as in data.source
        "formats": dict(sorted(format_counts.items())),
        # e.g. the one GIF among JPEGs: often a "photo unavailable" placeholder saved by a scraper
        "rare_format_files": [r["path"] for r in rows if format_counts[formats[r["path"]]] < RARE * len(rows)],
        "duplicates": sorted(sorted(paths) for paths in by_digest.values() if len(paths) > 1),
        "conflicting_labels": sorted(sorted(by_digest[d]) for d in conflicting),
        "moved_to_earlier_split": sorted(moved),
        "unused_class_folders": unused_class_folders(RAW, rows),
        "class_imbalance": class_imbalance(per_class),
    }
    write_json(DATA_REPORT, report)
    for folder in report["unused_class_folders"]:
        print(f"split: warning: class folder {folder['path']} has {folder['reason']}; it is not a class")
    imbalance = report["class_imbalance"]
    if imbalance["ratio"] >= IMBALANCE_WARNING:
        print(f"split: warning: class '{imbalance['largest']}' has {imbalance['ratio']}x the images of "
              f"'{imbalance['smallest']}'; consider train.class_balance=loss (or sampler), and read "
              f"balanced_accuracy in metrics/eval.json")
    print(f"split: {report['images']} across {len(classes)} classes; {len(skipped)} files skipped "
          f"(see {DATA_REPORT})")


if __name__ == "__main__":
    run_stage(main)
