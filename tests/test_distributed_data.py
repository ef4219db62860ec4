"""Data sharding for data-parallel training (issue 19, item 8), in one process: the streams of
W ranks take turns on the single-process sequence and keep a state that counts global samples;
shards are dealt to rank × DataLoader-worker slots and too few shards are refused with one line;
sharded validation batches are the single-process batches, each on one rank."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sftok.config import ConfigError
from sftok.data import TRAIN_PHOTOS, EmbeddedPhotos, ShardDataset, TrainStream, val_batches
from sftok.generation.pretokenize import TokenSet
from sftok.generation.train import TokenStream

SIZE = 16


def _embedded():
    return EmbeddedPhotos(TRAIN_PHOTOS, SIZE, 3, seed=0)  # 21 samples: batches span epochs


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("world", [2, 3])
def test_map_style_ranks_take_turns_on_the_single_process_batches(world):
    ds = _embedded()
    single = TrainStream(ds, batch_size=4, seed=7)
    ranks = [TrainStream(ds, batch_size=4, seed=7, rank=r, world_size=world)
             for r in range(world)]
    for _ in range(5):  # five rounds: 5·W batches of 4 cross several epochs of 21
        for r in range(world):
            assert _same(next(ranks[r]), next(single))
        # a step boundary: every rank holds the single process's state (global samples)
        assert all(s.state_dict() == single.state_dict() for s in ranks)


def test_map_style_rank_stream_resumes_from_the_shared_state():
    ds = _embedded()
    ref = TrainStream(ds, batch_size=4, seed=7, rank=1, world_size=2)
    expected = [next(ref) for _ in range(6)]
    first = TrainStream(ds, batch_size=4, seed=7, rank=0, world_size=2)
    for _ in range(3):
        next(first)
    resumed = TrainStream(ds, batch_size=4, seed=7, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())  # rank 0's checkpoint resumes rank 1
    for want in expected[3:]:
        assert _same(next(resumed), want)


def test_token_stream_ranks_take_turns():
    tokens = TokenSet(torch.arange(22 * 3).view(22, 3), torch.arange(22) % 5,
                      torch.zeros(22, dtype=torch.bool), {})
    single = TokenStream(tokens, 4, seed=1)
    it = iter(single)
    ranks = [TokenStream(tokens, 4, seed=1, rank=r, world_size=2) for r in range(2)]
    its = [iter(s) for s in ranks]
    for _ in range(7):
        for r in range(2):
            assert _same(next(its[r]), next(it))
        assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


# ---- webdataset shards ---------------------------------------------------------------------


def _image_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _shards(tmp_path, n_shards: int, per_shard: int = 3) -> str:
    import webdataset as wds

    k = 0
    for s in range(n_shards):
        with wds.TarWriter(str(tmp_path / f"shard-{s}.tar")) as sink:
            for _ in range(per_shard):
                sink.write({"__key__": f"s{k:04d}", "png": _image_bytes(k),
                            "cls": str(k).encode()})
                k += 1
    return str(tmp_path / f"shard-{{0..{n_shards - 1}}}.tar")


def test_shards_are_dealt_to_rank_and_worker_slots(tmp_path):
    ds = ShardDataset(_shards(tmp_path, 4), SIZE, train=True, seed=0, shuffle_buffer=1)
    per_rank = [[label for _, label in ds.configured(rank=r, world_size=2)] for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(12))  # every sample once
    assert not set(per_rank[0]) & set(per_rank[1])
    assert all(len(labels) == 6 for labels in per_rank)  # 2 whole shards each


def test_fewer_shards_than_slots_is_refused_with_one_line(tmp_path):
    ds = ShardDataset(_shards(tmp_path, 3), SIZE, train=True, seed=0)
    with pytest.raises(ConfigError) as err:
        TrainStream(ds, batch_size=2, seed=0, num_workers=2, rank=0, world_size=2)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("data.path:")
    assert "3 shard(s)" in msg and "4 slots" in msg and "data.num_workers" in msg
    TrainStream(ds, batch_size=2, seed=0, num_workers=1, rank=1, world_size=2)  # 3 >= 2: fine


def test_shard_stream_position_counts_global_samples(tmp_path):
    ds = ShardDataset(_shards(tmp_path, 4), SIZE, train=True, seed=0, shuffle_buffer=1)
    streams = [TrainStream(ds, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        for s in streams:
            next(s)
    # 2 rounds x 2 ranks x 2 images = 8 of the epoch's 12 samples, whichever rank is asked
    assert [s.state_dict()["position"] for s in streams] == [8, 8]
    # resumed from that state, each rank drops its share (4 each) and reads on in its shards
    resumed = TrainStream(ds, batch_size=2, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(streams[0].state_dict())
    want = next(streams[1])
    assert _same(next(resumed), want)


# ---- sharded validation batches --------------------------------------------------------------


@pytest.mark.parametrize("max_images", [None, 17])
def test_sharded_val_batches_are_the_single_process_batches(max_images):
    ds = EmbeddedPhotos(TRAIN_PHOTOS, SIZE, 3, seed=0)
    single = list(val_batches(ds, 4, max_images).indexed())
    shards = [list(val_batches(ds, 4, max_images, rank=r, world_size=3).indexed())
              for r in range(3)]
    merged = sorted((b for part in shards for b in part), key=lambda e: e[0])
    assert [b for b, _ in merged] == [b for b, _ in single]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(merged, single))
    assert all(b % 3 == r for r, part in enumerate(shards) for b, _ in part)


def test_sharded_val_batches_of_shards_read_everything_and_keep_their_own(tmp_path):
    ds = ShardDataset(_shards(tmp_path, 2, per_shard=5), SIZE, train=False)
    single = list(val_batches(ds, 3).indexed())
    shards = [val_batches(ds, 3, rank=r, world_size=2) for r in range(2)]
    parts = [list(s.indexed()) for s in shards]
    merged = sorted((b for part in parts for b in part), key=lambda e: e[0])
    assert [b for b, _ in merged] == [b for b, _ in single] == [0, 1, 2, 3]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(merged, single))
    assert [s.images for s in shards] == [6, 4]
