"""Teachers shipped with the library (sftok.released): a smoke teacher shipped into a temporary
folder is loaded like the released MaskGIT-VQGAN, identified by its content hash, and refused
with one line when damaged or when the config does not fit it; stage 0 writes its learning
curve. The real `tiny` release is checked against the preset it was made for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sftok import released
from sftok.config import ConfigError, override, to_dict
from sftok.data import build_train_view, build_val_dataset
from sftok.presets import get_preset
from sftok.released import ShippedTeacherError, content_hash, read_manifest
from sftok.released.ship import heldout_bounds, ship_teacher
from sftok.train import get_teacher, teacher_cache_key, teacher_stage
from sftok.train.stages import stage_identity, stage_key
from sftok.train.teacher_stage import load_cached_teacher, teacher_identity, train_teacher

NAME = "smoke-test"


def _smoke(**sets):
    return override(get_preset("smoke"), sets) if sets else get_preset("smoke")


def _shipped(**sets):
    return _smoke(**{"teacher.source": "shipped", "teacher.shipped": NAME, **sets})


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A smoke teacher trained with its curve and shipped into a temporary package folder."""
    root = tmp_path_factory.mktemp("shipped")
    cfg = _smoke(**{"train.teacher.steps": 4})
    entry = root / "entry"
    record = train_teacher(cfg, entry, curve_every=2)
    teacher = load_cached_teacher(cfg, entry)
    bounds = heldout_bounds(cfg, teacher)
    dest = root / "released"
    dest.mkdir()
    manifest = ship_teacher(entry, NAME, cfg, command="python scripts/train_teacher.py --preset "
                            "smoke --out DIR", extra=bounds, dest=dest)
    return {"cfg": cfg, "entry": entry, "record": record, "dest": dest, "manifest": manifest,
            "teacher": teacher}


@pytest.fixture
def shipped_here(release, monkeypatch):
    monkeypatch.setattr(released, "_root", lambda: release["dest"])
    return release


def test_stage0_writes_a_held_out_learning_curve(release):
    curve = release["record"]["curve"]
    assert [p["step"] for p in curve] == [2, 4]
    on_disk = json.loads((release["entry"] / "curve.json").read_text())
    assert on_disk == curve
    for p in curve:
        assert p["val_images"] == len(build_val_dataset(release["cfg"].data))
        assert p["train_images"] == len(build_train_view(release["cfg"].data)) > 0
        assert p["gap_db"] == pytest.approx(p["train_psnr"] - p["val_psnr"])
    # the last point is the finished teacher's held-out PSNR (same images, same weights)
    assert curve[-1]["val_psnr"] == pytest.approx(release["record"]["val_psnr"])


def test_manifest_records_what_made_the_file(release):
    m = json.loads(release["manifest"].read_text())
    weights = release["dest"] / f"{NAME}.safetensors"
    assert m["sha256"] == content_hash(weights) and m["bytes"] == weights.stat().st_size
    cfg = release["cfg"]
    assert m["teacher"] == {k: to_dict(cfg.teacher)[k] for k in released.ARCHITECTURE}
    assert m["train"] == to_dict(cfg.train.teacher) and m["image_size"] == 16
    assert m["cache_key"] == teacher_cache_key(cfg)
    assert m["curve"] == release["record"]["curve"] and m["command"].startswith("python ")
    assert {"teacher_psnr", "floor_teacher_psnr", "floor_tokenizer_psnr"} <= set(m)


def test_shipped_teacher_loads_without_training(shipped_here, monkeypatch, tmp_path):
    monkeypatch.setattr(teacher_stage, "train_teacher",
                        lambda *a, **k: pytest.fail("a shipped teacher must never be trained"))
    t = get_teacher(_shipped(), tmp_path / "empty-cache", train_if_missing=False)
    want = shipped_here["teacher"].model.state_dict()
    got = t.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not any(p.requires_grad for p in t.parameters())
    assert not (tmp_path / "empty-cache").exists()


def test_identity_is_the_content_hash(shipped_here):
    sha = read_manifest(NAME)["sha256"]
    assert teacher_identity(_shipped()) == f"shipped-{sha[:16]}"
    # stage keys follow the teacher's content, whatever its name or how it was trained
    ident = stage_identity(_shipped(), "stage1", None)
    assert ident["teacher"] == f"shipped-{sha[:16]}"
    trained = stage_identity(_smoke(**{"train.teacher.steps": 4}), "stage1", None)
    assert stage_key(ident) != stage_key(trained)


def test_a_damaged_file_fails_with_one_line(shipped_here, monkeypatch, tmp_path):
    copy = tmp_path / "released"
    copy.mkdir()
    for f in shipped_here["dest"].iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / f"{NAME}.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / f"{NAME}.safetensors").write_bytes(bytes(data))
    monkeypatch.setattr(released, "_root", lambda: copy)
    with pytest.raises(ShippedTeacherError, match="damaged or was replaced") as e:
        get_teacher(_shipped(), tmp_path)
    assert "\n" not in str(e.value)
    (copy / f"{NAME}.safetensors").unlink()
    with pytest.raises(ShippedTeacherError, match="missing"):
        get_teacher(_shipped(), tmp_path)


@pytest.mark.parametrize(("sets", "match"), [
    ({"teacher.codebook_size": 32}, r"teacher.codebook_size=32 does not match .*\(64\)"),
    ({"teacher.channel_mult": [1, 2, 2]}, r"teacher.channel_mult=\[1, 2, 2\] does not match"),
    ({"tokenizer.image_size": 32, "data.image_size": 32}, "trained on 16x16 images"),
    ({"teacher.shipped": "nope"}, r"no such shipped teacher \(shipped: smoke-test\)"),
    ({"teacher.sha256": "ab" * 32}, "ships another teacher than the config was made for"),
])
def test_a_config_that_does_not_fit_fails_with_one_line(shipped_here, tmp_path, sets, match):
    with pytest.raises(ShippedTeacherError, match=match) as e:
        get_teacher(_shipped(**sets), tmp_path)
    assert "\n" not in str(e.value)


def test_pinned_hash_that_matches_loads(shipped_here, tmp_path):
    sha = read_manifest(NAME)["sha256"]
    get_teacher(_shipped(**{"teacher.sha256": sha}), tmp_path)


def test_config_checks():
    with pytest.raises(ConfigError, match="teacher.shipped"):
        _smoke(**{"teacher.source": "shipped"})
    with pytest.raises(ConfigError, match="teacher.sha256"):
        _smoke(**{"teacher.sha256": "ABC"})


def test_a_pretrained_file_with_a_wrong_pinned_hash_is_refused(release, tmp_path):
    from sftok.weights import WeightsFileError

    weights = release["dest"] / f"{NAME}.safetensors"
    cfg = _smoke(**{"teacher.source": "pretrained", "teacher.weights": str(weights),
                    "teacher.sha256": "cd" * 32})
    with pytest.raises(WeightsFileError, match="is not teacher.sha256"):
        get_teacher(cfg, tmp_path)
    good = _smoke(**{"teacher.source": "pretrained", "teacher.weights": str(weights),
                     "teacher.sha256": content_hash(weights)})
    get_teacher(good, tmp_path)
    assert teacher_identity(good) == f"pretrained-{content_hash(weights)[:16]}"


# ---- the real release ------------------------------------------------------------------------


def test_tiny_loads_the_shipped_teacher_it_was_calibrated_with(tmp_path):
    cfg = get_preset("tiny")
    assert cfg.teacher.source == "shipped" and cfg.teacher.shipped == "tiny"
    m = read_manifest("tiny")
    assert cfg.teacher.sha256 == m["sha256"]
    t = get_teacher(cfg, tmp_path, train_if_missing=False)
    assert t.codebook_size == cfg.teacher.codebook_size and not (tmp_path / "teachers").exists()
    # The recipe: `--set teacher.source=train` runs exactly the stage 0 that made the file.
    trained = override(cfg, {"teacher.source": "train"})
    assert m["cache_key"] == teacher_cache_key(trained)
    data = to_dict(cfg.data)
    data.pop("num_workers")
    # Fields added to the stage-0 config after the file was trained are absent from its
    # manifest; the preset must hold the value that trains as the code then did (issue 19's
    # grad_accum: 1, no accumulation). Any other difference is a changed recipe.
    added_since = {"grad_accum": 1}
    assert m["data"] == data and {**added_since, **m["train"]} == to_dict(cfg.train.teacher)
    assert m["image_size"] == cfg.tokenizer.image_size
    assert "scripts/train_teacher.py" in m["command"] and m["curve"]


def test_the_shipped_files_are_package_data():
    root = Path(released.__file__).parent
    text = (root.parent.parent / "pyproject.toml").read_text()
    assert '"sftok.released" = ["*.safetensors", "*.json"]' in text
    assert (root / "tiny.safetensors").is_file() and (root / "tiny.json").is_file()


def test_a_built_wheel_ships_the_teacher_and_loads_it(tmp_path):
    """A normal (non-editable) install finds the package data: build a wheel from a copy of the
    sources, install it into a folder of its own, load the shipped teacher from there."""
    import shutil
    import subprocess
    import sys

    repo = Path(released.__file__).parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "sftok", src / "sftok",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, cwd=src)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import sftok, sftok.released as r; "
             "from sftok.presets import get_preset; cfg = get_preset('tiny'); "
             "s = r.load_shipped(cfg.teacher, cfg.tokenizer.image_size); "
             "print(sftok.__file__); print(s.sha256)")
    out = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout.split()
    assert Path(out[0]).is_relative_to(site)  # the wheel's copy, not this checkout
    assert out[1] == read_manifest("tiny")["sha256"]


def test_a_finished_teacher_is_returned_not_retrained(release, monkeypatch):
    monkeypatch.setattr(teacher_stage, "TeacherTask",
                        lambda *a, **k: pytest.fail("a finished teacher must not be rebuilt"))
    again = train_teacher(release["cfg"], release["entry"], curve_every=2)
    assert again == json.loads((release["entry"] / "teacher.json").read_text())
    assert again["train_time_s"] == release["record"]["train_time_s"]
