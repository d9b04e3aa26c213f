"""Stage `split`: check every image once and write the train/val/test manifest.

Each file in data/raw is decoded; the ones that can't be used are listed with the reason
in metrics/data_report.json and left out. The split is stratified per class and seeded,
and it depends only on file contents: a file's place is decided by a hash of (seed,
content), so listing order, machine, and images added to other classes change nothing.
Identical files always share a split (no leakage); identical files filed under two
different classes are left out as ambiguous. A folder already split into train/ and val/
(and optionally test/) keeps its split.
"""
import csv
import hashlib
import io
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from src.common import UserError, run_stage, write_json, write_text
from src.images import image_problem, is_image_name
from src.params import load_params

RAW = Path("data/raw")
MANIFEST = Path("data/manifest.csv")
REPORT = Path("metrics/data_report.json")
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inspect(path):
    """(path, sha256, problem or None) for one file; runs in a worker process."""
    if not is_image_name(path):
        return path, None, "not an image file (by its name); ignored"
    problem = image_problem(path)
    return path, (file_digest(path) if problem is None else None), problem


def find_files(raw):
    """[(path, class, split or None)] for every file under raw, and the layout's name."""
    top = sorted(p for p in raw.iterdir())
    top_dirs = [p for p in top if p.is_dir()]
    presplit = bool(top_dirs) and {p.name.lower() for p in top_dirs} <= set(SPLIT_DIRS) and any(
        p.name.lower() == "train" for p in top_dirs)
    found, stray = [], [p for p in top if p.is_file()]
    roots = [(d, SPLIT_DIRS[d.name.lower()]) for d in top_dirs] if presplit else [(raw, None)]
    for root, split in roots:
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(p for p in class_dir.rglob("*") if p.is_file()):
                found.append((f, class_dir.name, split))
        stray += [p for p in root.iterdir() if p.is_file()] if split else []
    return found, stray, ("pre-split" if presplit else "class folders")


def rank(seed, digest):
    return hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()


def split_class(name, digests, ratios, seed):
    """Assign each distinct content of one class to a split; returns {digest: split}."""
    ordered = sorted(set(digests), key=lambda d: rank(seed, d))
    n = len(ordered)
    counts = {s: (max(1, round(n * r)) if r > 0 else 0) for s, r in ratios.items()}
    if n - counts["val"] - counts["test"] < 1:
        raise UserError(
            f"class '{name}' has {n} distinct images, too few for data.val={ratios['val']} and "
            f"data.test={ratios['test']} (each non-zero split takes at least 1 per class); "
            f"add images or lower the ratios")
    n_test, n_val = counts["test"], counts["val"]
    return {d: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, d in enumerate(ordered)}


def build_manifest(files, seed, ratios):
    by_digest_classes = defaultdict(set)
    for f in files:
        by_digest_classes[f["sha256"]].add(f["label"])
    conflicting = {d for d, classes in by_digest_classes.items() if len(classes) > 1}
    kept = [f for f in files if f["sha256"] not in conflicting]

    if any(f["split"] for f in kept):  # pre-split: keep it; a copy already in an earlier split is dropped
        order = {"train": 0, "val": 1, "test": 2}
        first_split = {}
        for f in sorted(kept, key=lambda f: order[f["split"]]):
            first_split.setdefault(f["sha256"], f["split"])
        for f in kept:
            f["split"] = first_split[f["sha256"]]
    else:
        classes = defaultdict(list)
        for f in kept:
            classes[f["label"]].append(f["sha256"])
        assignment = {}
        for name, digests in classes.items():
            assignment.update(split_class(name, digests, ratios, seed))
        for f in kept:
            f["split"] = assignment[f["sha256"]]
    return kept, conflicting


def main():
    params = load_params()
    if not RAW.is_dir():
        raise UserError(f"{RAW} not found: run `dvc repro ingest` first")
    found, stray, layout = find_files(RAW)
    with ProcessPoolExecutor() as pool:
        results = list(pool.map(inspect, [f for f, _, _ in found], chunksize=32))
    skipped = [{"path": str(p), "reason": "not inside a class folder; ignored"} for p in stray]
    files = []
    for (path, label, split), (_, digest, problem) in zip(found, results):
        if problem:
            skipped.append({"path": str(path), "reason": problem})
        else:
            files.append({"path": str(path), "label": label, "split": split, "sha256": digest})

    ratios = {"val": params["data"]["val"], "test": params["data"]["test"]}
    rows, conflicting = build_manifest(files, params["seed"], ratios)
    classes = sorted({r["label"] for r in rows})
    if len(classes) < 2:
        raise UserError(f"{RAW} holds {len(classes)} usable class(es) {classes}; a classifier needs at least 2 "
                        f"class sub-folders of images (check data.source={params['data']['source']!r})")
    rows.sort(key=lambda r: (r["split"], r["label"], r["path"]))

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "label", "split", "sha256"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(MANIFEST, buf.getvalue())

    by_digest = defaultdict(list)
    for f in files:
        by_digest[f["sha256"]].append(f["path"])
    per_class = {c: {s: 0 for s in ("train", "val", "test")} for c in classes}
    for r in rows:
        per_class[r["label"]][r["split"]] += 1
    report = {
        "dataset_digest": hashlib.sha256(buf.getvalue().encode()).hexdigest(),
        "layout": layout,
        "num_classes": len(classes),
        "images": {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "val", "test")},
        "per_class": per_class,
        "skipped": sorted(skipped, key=lambda s: s["path"]),
        "duplicates": sorted(sorted(paths) for paths in by_digest.values() if len(paths) > 1),
        "conflicting_labels": sorted(sorted(by_digest[d]) for d in conflicting),
    }
    write_json(REPORT, report)
    print(f"split: {report['images']} across {len(classes)} classes; {len(skipped)} files skipped "
          f"(see {REPORT})")


if __name__ == "__main__":
    run_stage(main)
