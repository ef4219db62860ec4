"""Data package: embedded photos, image folders, shards, the resumable stream (issue 3, part 1)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sftok.config import ConfigError, DataConfig
from sftok.data import (
    EXTRA_TRAIN_PHOTOS,
    PHOTOS,
    TRAIN_PHOTOS,
    VAL_PHOTOS,
    CorruptImageWarning,
    EmbeddedPhotos,
    ImageFolder,
    ShardDataset,
    TrainStream,
    build_datasets,
    val_batches,
)
from sftok.data.embedded import photo_crops
from sftok.presets import get_preset

SIZE = 16


def _write_image(path, seed: int, size=(40, 28), fmt="JPEG") -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)


def _image_bytes(seed: int, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def imagenet_like(tmp_path):
    """root/<class>/*.JPEG with 2 classes × 3 images."""
    root = tmp_path / "train"
    for c, name in enumerate(["n02", "n01"]):  # unsorted on purpose: labels follow sorted names
        (root / name).mkdir(parents=True)
        for k in range(3):
            _write_image(root / name / f"img{k}.JPEG", seed=10 * c + k)
    return root


# --- embedded ---------------------------------------------------------------------------------


def test_embedded_same_seed_identical_different_seed_differs():
    a = photo_crops("astronaut", SIZE, 3, seed=0)
    b = photo_crops("astronaut", SIZE, 3, seed=0)
    c = photo_crops("astronaut", SIZE, 3, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # A photo's k-th crop does not depend on how many crops were asked for.
    assert torch.equal(photo_crops("astronaut", SIZE, 5, seed=0)[:3], a)


@pytest.mark.parametrize("photo,digest", [("astronaut", "08f42f2f5d466955"),
                                          ("retina", "cdf337c7770503dc"),
                                          ("chelsea", "be98857574d7c9ce")])
def test_embedded_pinned_bytes(photo, digest):
    # "Same seed => same images on every machine": pinned on the reference machine. A mismatch
    # means the photos, the crop sampler or the resize changed, and cached teachers/results made
    # from the embedded data are no longer comparable.
    import hashlib

    crops = photo_crops(photo, SIZE, 4, seed=0)
    assert hashlib.sha256(crops.numpy().tobytes()).hexdigest()[:16] == digest


def test_embedded_split_disjoint_shapes_ranges():
    train, val = build_datasets(DataConfig(image_size=SIZE, train_crops_per_image=3,
                                           val_crops_per_image=2, seed=0))
    assert len(train) == 3 * len(TRAIN_PHOTOS) and len(val) == 2 * len(VAL_PHOTOS)
    assert set(train.labels.tolist()).isdisjoint(val.labels.tolist())
    # the fixed pool (no extra_photos) uses the first ten photos, every one of them
    assert set(train.labels.tolist()) | set(val.labels.tolist()) == set(range(10))
    image, label = train[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and isinstance(label, int)
    assert PHOTOS[label] == TRAIN_PHOTOS[0]
    assert train.images.float().std() > 10  # real photo content, not a constant


def test_embedded_unknown_photo():
    with pytest.raises(ValueError, match="unknown embedded photos"):
        EmbeddedPhotos(("eagle",), SIZE, 1)


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_presets_build(preset):
    cfg = get_preset(preset).data
    train, val = build_datasets(cfg)
    assert train[0][0].shape == (3, cfg.image_size, cfg.image_size)
    photos = TRAIN_PHOTOS + (EXTRA_TRAIN_PHOTOS if cfg.extra_photos else ())
    assert train.num_photo_samples == cfg.train_crops_per_image * len(photos)
    assert len(train) == train.num_photo_samples + round(
        cfg.dead_leaves / (1 - cfg.dead_leaves) * train.num_photo_samples)
    assert len(val) == cfg.val_crops_per_image * len(VAL_PHOTOS)


# --- folder -----------------------------------------------------------------------------------


def test_folder_layout_labels(imagenet_like):
    ds = ImageFolder(imagenet_like, SIZE)
    assert ds.classes == ["n01", "n02"]
    assert ds.labels == [0, 0, 0, 1, 1, 1]
    assert all(p.parent.name == ds.classes[lab] for p, lab in zip(ds.files, ds.labels))
    image, label = ds[4]
    assert image.shape == (3, SIZE, SIZE) and 0 <= image.min() and image.max() <= 1
    assert label == 1


def test_folder_flat_label_zero(tmp_path):
    for k in range(3):
        _write_image(tmp_path / f"{k}.png", seed=k, fmt="PNG")
    ds = ImageFolder(tmp_path, SIZE)
    assert len(ds) == 3 and ds.labels == [0, 0, 0]
    assert ds[2][0].shape == (3, SIZE, SIZE)


def test_eval_transform_deterministic_and_train_crop_seeded(imagenet_like):
    val = ImageFolder(imagenet_like, SIZE, train=False)
    assert torch.equal(val[1][0], val[1][0])
    assert torch.equal(val.sample(1, seed=123)[0], val[1][0])  # eval ignores seeds
    train = ImageFolder(imagenet_like, SIZE, train=True)
    assert torch.equal(train.sample(1, 7)[0], train.sample(1, 7)[0])
    crops = {train.sample(1, s)[0].sum().item() for s in range(8)}
    assert len(crops) > 1  # different seeds pick different crops (40x28 -> shorter edge 16)


def test_corrupt_image_skipped_counted_warned_once(imagenet_like):
    bad = [imagenet_like / "n01" / "broken.JPEG", imagenet_like / "n02" / "broken2.JPEG"]
    for p in bad:
        p.write_bytes(b"this is not a jpeg" * 10)
    ds = ImageFolder(imagenet_like, SIZE, train=True)
    assert len(ds) == 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [ds.sample(i, seed=i) for i in range(len(ds))] + [ds[i] for i in range(len(ds))]
    corrupt = [w for w in caught if issubclass(w.category, CorruptImageWarning)]
    assert len(corrupt) == 1 and "broken" in str(corrupt[0].message)
    assert ds.skipped == 2
    assert "2 undecodable" in ds.skip_log.report()
    assert all(img.shape == (3, SIZE, SIZE) for img, _ in items)
    # The replacement is deterministic: the next decodable file.
    i = ds.files.index(bad[0])
    assert torch.equal(ds[i][0], ds[i + 1][0])


def test_missing_and_empty_paths_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path.*does not exist"):
        build_datasets(DataConfig(source="folder", path=str(tmp_path / "nope"),
                                  val_path=str(tmp_path)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data\.path.*no images"):
        build_datasets(DataConfig(source="folder", path=str(tmp_path / "empty"),
                                  val_path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"data\.path.*required"):
        build_datasets(DataConfig(source="folder"))
    with pytest.raises(ConfigError, match=r"data\.path.*not found"):
        build_datasets(DataConfig(source="webdataset", path=str(tmp_path / "x-{0..1}.tar"),
                                  val_path=str(tmp_path / "v.tar")))


def test_build_folder_imagenet_root(imagenet_like):
    val = imagenet_like.parent / "val"
    (val / "n01").mkdir(parents=True)
    _write_image(val / "n01" / "v.JPEG", seed=99)
    train_ds, val_ds = build_datasets(DataConfig(source="folder", path=str(imagenet_like.parent),
                                                 image_size=SIZE))
    assert len(train_ds) == 6 and len(val_ds) == 1 and train_ds.train and not val_ds.train


# --- shards -----------------------------------------------------------------------------------


def _write_shards(tmp_path, corrupt: bool = False) -> str:
    import webdataset as wds

    k = 0
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s}.tar")) as sink:
            for _ in range(5):
                ext = "png" if k % 2 else "jpg"
                data = _image_bytes(k, "PNG" if ext == "png" else "JPEG")
                if corrupt and k == 3:
                    data = b"garbage bytes"
                sink.write({"__key__": f"s{k:04d}", ext: data, "cls": str(k % 4).encode()})
                k += 1
    return str(tmp_path / "shard-{0..1}.tar")


def test_shards_round_trip(tmp_path):
    pattern = _write_shards(tmp_path)
    val = ShardDataset(pattern, SIZE, train=False)
    items = list(val)
    assert [lab for _, lab in items] == [k % 4 for k in range(10)]
    assert all(img.shape == (3, SIZE, SIZE) and 0 <= img.min() and img.max() <= 1
               for img, _ in items)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(items, list(val)))  # deterministic
    train = ShardDataset(pattern, SIZE, train=True, seed=3, shuffle_buffer=4)
    labels = [lab for _, lab in train]
    assert sorted(labels) == sorted(k % 4 for k in range(10))
    batches = list(val_batches(val, batch_size=4, max_images=7))
    assert [b.shape[0] for b in batches] == [4, 3]


def test_shards_corrupt_sample_skipped(tmp_path):
    ds = ShardDataset(_write_shards(tmp_path, corrupt=True), SIZE, train=False)
    with pytest.warns(CorruptImageWarning):
        items = list(ds)
    assert len(items) == 9 and ds.skipped == 1


def test_shard_stream_resume(tmp_path):
    ds = ShardDataset(_write_shards(tmp_path), SIZE, train=True, seed=0, shuffle_buffer=3)
    ref = TrainStream(ds, batch_size=3, seed=5)
    expected = [next(ref) for _ in range(8)]  # 24 samples: crosses two epoch boundaries
    first = TrainStream(ds, batch_size=3, seed=5)
    for _ in range(4):
        next(first)
    resumed = TrainStream(ds, batch_size=3, seed=5)
    resumed.load_state_dict(first.state_dict())
    for want in expected[4:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- stream -----------------------------------------------------------------------------------


def _embedded(crops=3):
    return EmbeddedPhotos(TRAIN_PHOTOS, SIZE, crops, seed=0)


def check_resume_exact(ds, k: int, batch_size: int = 4, seed: int = 11) -> None:
    """A stream restored after k batches yields exactly the uninterrupted stream's next 6."""
    ref = TrainStream(ds, batch_size=batch_size, seed=seed)
    expected = [next(ref) for _ in range(k + 6)]
    first = TrainStream(ds, batch_size=batch_size, seed=seed)
    for _ in range(k):
        next(first)
    state = first.state_dict()
    resumed = TrainStream(ds, batch_size=batch_size, seed=seed)
    resumed.load_state_dict(state)
    for want in expected[k:]:
        got = next(resumed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("k", [0, 3, 7])
def test_stream_resume_exact(k):
    check_resume_exact(_embedded(), k)  # 21 samples; batch 4 spans epoch boundaries


def test_stream_epochs_cover_dataset_and_flip():
    ds = _embedded()
    stream = TrainStream(ds, batch_size=7, seed=0)
    labels = torch.cat([next(stream)[1] for _ in range(3)])  # exactly one epoch
    assert sorted(labels.tolist()) == sorted(ds.labels.tolist())
    assert stream.state_dict()["epoch"] == 1 and stream.state_dict()["position"] == 0
    images = torch.cat([next(TrainStream(ds, 21, seed=0, flip=f))[0] for f in (False, True)])
    plain, flipped = images[:21], images[21:]
    same = [torch.equal(a, b) for a, b in zip(plain, flipped)]
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(plain, flipped)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)


def test_stream_seed_changes_order():
    ds = _embedded()
    a = next(TrainStream(ds, batch_size=8, seed=0))[1]
    b = next(TrainStream(ds, batch_size=8, seed=1))[1]
    assert not torch.equal(a, b)


def test_stream_rejects_foreign_state():
    ds = _embedded()
    with pytest.raises(ValueError, match="seed"):
        TrainStream(ds, 4, seed=1).load_state_dict(TrainStream(ds, 4, seed=2).state_dict())


def test_stream_workers_match_in_process(imagenet_like):
    ds = ImageFolder(imagenet_like, SIZE, train=True)
    solo = TrainStream(ds, batch_size=4, seed=3)
    workers = TrainStream(ds, batch_size=4, seed=3, num_workers=2)
    for _ in range(4):
        a, b = next(solo), next(workers)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert solo.state_dict() == workers.state_dict()


def test_val_batches_bounded_and_ordered():
    _, val = build_datasets(DataConfig(image_size=SIZE, val_crops_per_image=3))
    batches = list(val_batches(val, batch_size=4))
    assert [b.shape[0] for b in batches] == [4, 4, 1]
    assert torch.equal(torch.cat(batches), val.images.float() / 255)
    assert sum(b.shape[0] for b in val_batches(val, batch_size=4, max_images=5)) == 5


def _with_bad_files(root):
    """Truncated, empty and fake image files next to the good ones (issue 13)."""
    good = (root / "n01" / "img0.JPEG").read_bytes()
    (root / "n01" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (root / "n02" / "empty.JPEG").write_bytes(b"")
    (root / "n02" / "fake.png").write_bytes(b"not an image at all" * 20)
    return 3


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluation_leaves_bad_files_out_and_counts_them(imagenet_like, workers):
    """No bad file is replaced by a duplicate of a good one: 6 good files -> 6 distinct images."""
    n_bad = _with_bad_files(imagenet_like)
    val = ImageFolder(imagenet_like, SIZE, train=False)
    assert len(val) == 6 + n_bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        batches = val_batches(val, batch_size=4, num_workers=workers)
        images = torch.cat(list(batches))
    assert images.shape[0] == 6 and (batches.images, batches.skipped) == (6, n_bad)
    assert len({img.numpy().tobytes() for img in images}) == 6
    assert batches.summary() == f"{n_bad} undecodable validation image file(s) left out; 6 evaluated"
    capped = val_batches(val, batch_size=2, max_images=5, num_workers=workers)
    assert sum(b.shape[0] for b in capped) == 5 and capped.images == 5


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_counts_replaced_files(imagenet_like, workers):
    n_bad = _with_bad_files(imagenet_like)
    ds = ImageFolder(imagenet_like, SIZE, train=True)
    stream = TrainStream(ds, batch_size=len(ds), seed=0, num_workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        images, _ = next(stream)  # one epoch: every file looked up once
    assert images.shape[0] == len(ds) and stream.skipped >= n_bad
    if workers == 0:
        assert stream.skipped == n_bad


def test_train_view_is_the_colour_training_photos_without_augmentation():
    from sftok.data import build_train_view
    from sftok.data.embedded import GREY_PHOTOS

    cfg = get_preset("tiny").data
    view = build_train_view(cfg)
    assert not set(view.photos) & (GREY_PHOTOS | set(VAL_PHOTOS))
    assert set(TRAIN_PHOTOS) <= set(view.photos) and len(view) == 10 * cfg.val_crops_per_image
    assert torch.equal(view[3][0], build_train_view(cfg)[3][0])  # a fixed, deterministic view
