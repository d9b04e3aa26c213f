"""The split: content-determined, leak-free, cached checks; bad images reported; real photos kept as split."""
import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_ingest import one_line_error, stage

from conftest import SHARED, make_project, run
from test_images import write_bad_files, write_mode_images

SEEDED = np.random.default_rng(0)


def noise_png(path, rng=SEEDED):
    """A distinct 12x12 picture (random pixels) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(path)


def make_classes(folder, counts):
    for name, n in counts.items():
        for i in range(n):
            noise_png(Path(folder) / name / f"img {i:02d}.png")
    return Path(folder)


def manifest(folder):
    with open(Path(folder) / "data/manifest.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def report(folder):
    return json.loads((Path(folder) / "metrics/data_report.json").read_text(encoding="utf-8"))


def split_of(folder, path_prefix=""):
    return {r["path"]: r["split"] for r in manifest(folder) if r["path"].startswith(path_prefix)}


def ingest_and_split(project, source, **overrides):
    assert stage(project, "ingest", {"data.source": str(source), **overrides}).returncode == 0
    return stage(project, "split")


def test_split_depends_only_on_contents_and_is_cached(tmp_path):
    source = make_classes(tmp_path / "photos", {"cats": 20, "dogs": 15, "ñandú birds": 12})
    first = ingest_and_split(tmp_path / "a", source)
    assert "(47 decoded" in first.stdout, first.stdout
    rows = manifest(tmp_path / "a")
    assert len(rows) == 47 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert all(sum(r["label"] == c and r["split"] == s for r in rows) >= 1
               for c in ("cats", "dogs", "ñandú birds") for s in ("train", "val", "test"))

    # The same files written in another order: byte-identical manifest and digest.
    shuffled = tmp_path / "shuffled"
    files = [p for p in source.rglob("*.png")]
    random.Random(1).shuffle(files)
    for p in files:
        (shuffled / p.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, shuffled / p.relative_to(source))
    again = ingest_and_split(tmp_path / "b", shuffled)
    assert (tmp_path / "a/data/manifest.csv").read_bytes() == (tmp_path / "b/data/manifest.csv").read_bytes()
    assert report(tmp_path / "a")["dataset_digest"] == report(tmp_path / "b")["dataset_digest"]
    assert "(47 decoded" in again.stdout  # another project: its own cache

    # Rerun with other ratios: nothing decoded again, and still deterministic.
    rerun = stage(tmp_path / "a", "split", {"data.val": 0.2})
    assert rerun.returncode == 0 and "(0 decoded" in rerun.stdout, rerun.stdout

    # A new image in cats moves no dog or bird.
    before = split_of(tmp_path / "a")
    noise_png(source / "cats" / "new one.png")
    ingest_and_split(tmp_path / "a", source, **{"data.val": 0.2})
    after = split_of(tmp_path / "a")
    assert len(after) == len(before) + 1
    assert {p: s for p, s in after.items() if "/cats/" not in p} == {p: s for p, s in before.items()
                                                                     if "/cats/" not in p}


def test_identical_contents_never_straddle_splits(tmp_path):
    source = make_classes(tmp_path / "photos", {"a": 12, "b": 12})
    for i in range(6):  # copies inside a class, in nested folders
        (source / "a" / "copies" / f"{i}").mkdir(parents=True)
        shutil.copy(source / "a" / f"img {i:02d}.png", source / "a" / "copies" / f"{i}" / "again.png")
    shutil.copy(source / "a" / "img 11.png", source / "b" / "which class.png")  # same picture, two classes
    assert ingest_and_split(tmp_path / "p", source).returncode == 0
    rows = manifest(tmp_path / "p")
    by_digest = {}
    for r in rows:
        by_digest.setdefault(r["sha256"], set()).add(r["split"])
    assert all(len(splits) == 1 for splits in by_digest.values())
    assert len(rows) == (12 + 6 - 1) + 12  # the picture filed under both classes is left out of both
    data = report(tmp_path / "p")
    assert data["conflicting_labels"] == [["data/raw/a/img 11.png", "data/raw/b/which class.png"]]
    assert len(data["duplicates"]) == 7


def test_an_image_over_data_max_pixels_is_skipped_and_named_and_the_cache_knows_the_budget(tmp_path):
    source = make_classes(tmp_path / "photos", {"a": 10, "b": 10})
    Image.new("RGB", (40, 30), (9, 9, 9)).save(source / "a" / "big.png")  # 1,200 px; the others 144
    assert ingest_and_split(tmp_path / "p", source, **{"data.max_pixels": 1000}).returncode == 0
    (skipped,) = report(tmp_path / "p")["skipped"]
    assert skipped["path"] == "data/raw/a/big.png"
    assert "40 x 30 px" in skipped["reason"] and "data.max_pixels" in skipped["reason"]
    assert "data/raw/a/big.png" not in split_of(tmp_path / "p")
    again = stage(tmp_path / "p", "split", {"data.max_pixels": 2000})  # the cached check was for 1000
    assert again.returncode == 0 and report(tmp_path / "p")["skipped"] == []
    assert "data/raw/a/big.png" in split_of(tmp_path / "p")


def test_too_few_images_or_one_class_is_a_clear_error(tmp_path):
    source = make_classes(tmp_path / "photos", {"plenty": 10, "tiny": 2, "lonely": 1})
    one_line_error(ingest_and_split(tmp_path / "p", source), "'tiny' (2)", "'lonely' (1)", "needs 3")
    assert not (tmp_path / "p/data/manifest.csv").exists()
    ok = stage(tmp_path / "p", "split", {"data.val": 0.1, "data.test": 0})  # needs 2: lonely still fails
    one_line_error(ok, "'lonely' (1)")
    shutil.rmtree(source / "lonely")
    assert ingest_and_split(tmp_path / "p", source, **{"data.test": 0}).returncode == 0
    one_class = make_classes(tmp_path / "one", {"only": 10})
    one_line_error(ingest_and_split(tmp_path / "q", one_class), "at least 2", "['only']")


def test_pre_split_without_val_takes_val_from_train(tmp_path):
    source = make_classes(tmp_path / "photos" / "train", {"a": 10, "b": 10})
    make_classes(source.parent / "test", {"a": 3, "b": 3})
    assert ingest_and_split(tmp_path / "p", source.parent).returncode == 0
    rows = manifest(tmp_path / "p")
    assert all(r["split"] == "test" for r in rows if r["path"].startswith("data/raw/test/"))
    assert {r["split"] for r in rows if r["path"].startswith("data/raw/train/")} == {"train", "val"}
    assert report(tmp_path / "p")["layout"] == "pre-split"


def test_class_folders_that_give_no_images_are_named_in_the_report(tmp_path):
    source = make_classes(tmp_path / "photos", {"a": 5, "b": 5})
    (source / "empty class").mkdir()
    (source / "all bad").mkdir()
    (source / "all bad" / "broken.jpg").write_bytes(b"not a picture")
    result = ingest_and_split(tmp_path / "p", source)
    assert result.returncode == 0
    assert report(tmp_path / "p")["unused_class_folders"] == [
        {"path": "data/raw/all bad", "reason": "no usable images (1 files, all skipped or conflicting)"},
        {"path": "data/raw/empty class", "reason": "no files"}]
    assert "class folder data/raw/empty class has no files" in result.stdout
    # Pre-split: a class folder empty in one split only is named with its split.
    make_classes(tmp_path / "pre" / "train", {"a": 5, "b": 5})
    make_classes(tmp_path / "pre" / "val", {"a": 2})
    (tmp_path / "pre" / "val" / "b").mkdir()
    assert ingest_and_split(tmp_path / "q", tmp_path / "pre").returncode == 0
    assert report(tmp_path / "q")["unused_class_folders"] == [{"path": "data/raw/val/b", "reason": "no files"}]


@pytest.mark.slow
def test_bad_files_are_reported_and_every_good_one_trained_on(tmp_path):
    """Each bad case and each awkward mode in one dataset, through ingest, split, classes and train."""
    source = tmp_path / "my photos"
    good = {f"mouettes rieuses/{n}" for n in write_mode_images(source / "mouettes rieuses")}
    bad = {f"mouettes rieuses/{n}": w for n, w in write_bad_files(source / "mouettes rieuses").items()}
    for i in range(8):
        noise_png(source / "café crème" / "vacances d'été" / f"photo {i}.png")
        good.add(f"café crème/vacances d'été/photo {i}.png")
    noise_png(source / "stray at top.png")
    (source / ".DS_Store").write_bytes(b"\0Bud1")
    bad.update({"stray at top.png": "not inside a class folder", ".DS_Store": "hidden"})
    project = make_project(tmp_path / "project", {"data.source": str(source), "train.epochs": 1})
    run(["dvc", "repro", "train"], project)

    skipped = {s["path"].removeprefix("data/raw/"): s["reason"] for s in report(project)["skipped"]}
    # hidden files never reach data/raw: ingest leaves them out, and the report names them
    skipped.update({s["path"]: s["reason"] for s in report(project)["not_ingested"]})
    assert set(skipped) == set(bad)
    for path, words in bad.items():
        assert words in skipped[path], (path, skipped[path])
    assert {r["path"].removeprefix("data/raw/") for r in manifest(project)} == good
    classes = json.loads((project / "data/class_indices.json").read_text(encoding="utf-8"))
    assert classes == {"0": "café crème", "1": "mouettes rieuses"}
    assert json.loads((project / "metrics/train.json").read_text())["epochs_run"] == 1


HYMENOPTERA = SHARED / "hymenoptera"


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="no ../shared/datasets/hymenoptera here")
def test_hymenoptera_keeps_its_split(tmp_path, monkeypatch):
    project = make_project(tmp_path / "project", {"data.source": str(HYMENOPTERA), "data.image_size": 64,
                                                  "train.epochs": 1, "train.batch_size": 32})
    run(["dvc", "repro", "evaluate"], project)
    rows = manifest(project)
    for r in rows:
        assert r["split"] == r["path"].split("/")[2], r  # data/raw/<split>/<class>/<file>
    given = {p.relative_to(HYMENOPTERA).as_posix() for p in HYMENOPTERA.rglob("*") if p.is_file()}
    assert {r["path"].removeprefix("data/raw/") for r in rows} == given
    data = report(project)
    assert data["layout"] == "pre-split" and data["images"]["test"] == 0
    # The placeholder GIF is a valid picture (so it is used), but the report points it out.
    assert data["rare_format_files"] == ["data/raw/train/ants/imageNotFound.gif"]
    assert data["formats"]["GIF"] == 1 and data["skipped"] == []
    assert json.loads((project / "data/class_indices.json").read_text()) == {"0": "ants", "1": "bees"}
    # No test/ here: evaluate and predict use the val images instead.
    val = [r["path"] for r in rows if r["split"] == "val"]
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert evaluation["val/images"] == len(val) == 153
    # Real photos of all sizes: training's validation scored them exactly as evaluate does.
    assert json.loads((project / "metrics/train.json").read_text())["best_val_acc"] == evaluation["val/accuracy"]
    # ... and so does predict's default input (the stage's `predict.input: test`).
    from src.predict import expand_inputs
    monkeypatch.chdir(project)
    assert [p.as_posix() for p in expand_inputs(["test"])] == val


def test_checkpoint_with_other_classes_is_refused(tmp_path):
    from src.core.errors import UserError
    from src.data.manifest import check_same_classes

    index = tmp_path / "class_indices.json"
    index.write_text(json.dumps({"0": "café crème", "1": "mouettes rieuses"}), encoding="utf-8")
    check_same_classes(["café crème", "mouettes rieuses"], path=index)
    with pytest.raises(UserError, match="retrain"):
        check_same_classes(["mouettes rieuses", "café crème"], path=index)  # same names, other order
