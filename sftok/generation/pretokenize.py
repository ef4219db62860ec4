"""Pre-tokenisation: a dataset's token ids, extracted once with a finished tokenizer and cached.

The generator trains on tokens, never on pixels (released recipe: centre crops plus their
horizontal flips). `pretokenize` encodes every image of a map-style dataset in its
deterministic (evaluation) view, and with `flips` also its mirror image, giving M = n or 2n rows.

Token assignment at inference is recorded: `nearest` (default) gives each image's tokens
independently of the batch; `sinkhorn` (the reference's behaviour, DESIGN §1) makes them
depend on the other images of the batch, so `batch_size` then changes the tokens.

Cache: `cache_dir/tokens/<key>.safetensors`, key = sha256 of (tokenizer weights, data key,
assignment, flips, batch size for sinkhorn). The file holds tokens M×K, labels M, flipped M and
metadata (what was used, content hash of the images); a hit reads it without touching the data.
It is published whole with its digest and checked when read (`sftok.storage`): a truncated or
altered file is rebuilt, never used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from sftok.data.transforms import hflip
from sftok.data.uint8 import ContentHash, to_uint8
from sftok.storage import (
    DamagedFileError,
    open_tensors,
    publish_tensors,
    rebuilding,
    tensors_sha256,
)


@dataclass
class TokenSet:
    """Tokens of a dataset: M rows (each image, then its flip when `flips`)."""

    tokens: Tensor  # M×K long, ids in [0, Q)
    labels: Tensor  # M long, class indices
    flipped: Tensor  # M bool, True = the row encodes the mirrored image
    meta: dict  # tokenizer_sha256, data_key, assign, flips, num_images, content_sha256, ...

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def classes(self) -> list[int]:
        return sorted(int(c) for c in self.labels.unique())


def weights_sha256(path: str | os.PathLike) -> str:
    """`sftok.storage.tensors_sha256` of a safetensors file's tensors.

    Over the tensors, not the file's bytes: two bitwise-equal models written by different runs
    can differ in their header layout, and must share their cached tokens.
    """
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()  # a safe_open handle is not iterable
        return tensors_sha256({name: f.get_tensor(name) for name in names})


def token_cache_path(cache_dir: str | os.PathLike, tokenizer_sha256: str, data_key: str,
                     assign: str, flips: bool, batch_size: int) -> Path:
    ident = {"tokenizer": tokenizer_sha256, "data": data_key, "assign": assign, "flips": flips}
    if assign == "sinkhorn":  # ids depend on the batch only under Sinkhorn
        ident["batch_size"] = batch_size
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "tokens" / f"{key}.safetensors"


@contextlib.contextmanager
def assignment(tokenizer, assign: str) -> Iterator[None]:
    """Run the tokenizer's quantizer with `assign` at inference (nearest / sinkhorn)."""
    if assign not in ("nearest", "sinkhorn"):
        raise ValueError(f"unknown token assignment {assign!r} (known: nearest, sinkhorn)")
    q = tokenizer.quantize
    old = q.cfg
    if old.kind == "vq" and assign == "sinkhorn":
        raise ValueError("assign=sinkhorn needs an optvq quantizer; this tokenizer uses vq "
                         "(always nearest): set generation.assign=nearest")
    q.cfg = dataclasses.replace(old, assign_at_inference=assign)
    try:
        yield
    finally:
        q.cfg = old


def _batches(dataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise TypeError("pretokenize needs a map-style dataset (embedded photos or an image "
                        "folder); webdataset shards are not supported for pre-tokenisation")
    view = dataset.sample if hasattr(dataset, "sample") else None
    for start in range(0, len(dataset), batch_size):
        items = [view(i, None) if view else dataset[i]
                 for i in range(start, min(start + batch_size, len(dataset)))]
        yield torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


@torch.no_grad()
def pretokenize(tokenizer, dataset, *, flips: bool = True, assign: str = "nearest",
                batch_size: int = 64, device=None, max_images: int | None = None) -> TokenSet:
    """Encode every image of `dataset` (its deterministic view) -> TokenSet (not cached).

    Images are quantised to 8 bits first (as stored data would be), so a cached token set and
    its content hash describe exactly the pixels that were encoded.
    """
    device = torch.device(device) if device is not None else next(tokenizer.parameters()).device
    was_training = tokenizer.training
    tokenizer.eval()
    toks, labs, flp = [], [], []
    content = ContentHash()
    n = 0
    try:
        with assignment(tokenizer, assign):
            for x, y in _batches(dataset, batch_size):
                # Procedural samples (embedded dead leaves, label < 0) belong to no class: a
                # class-conditional generator has nothing to learn from them.
                x, y = x[y >= 0], y[y >= 0]
                if max_images is not None:
                    x, y = x[:max_images - n], y[:max_images - n]
                if max_images is not None and n >= max_images:
                    break
                if x.shape[0] == 0:
                    continue
                x_u8 = to_uint8(x)
                content.update(x_u8)
                x = x_u8.to(device).float() / 255
                views = [(x, False), (hflip(x), True)] if flips else [(x, False)]
                for v, f in views:
                    toks.append(tokenizer.encode(v).ids.cpu())
                    labs.append(y)
                    flp.append(torch.full_like(y, f, dtype=torch.bool))
                n += x.shape[0]
    finally:
        tokenizer.train(was_training)
    if n == 0:
        raise ValueError("pretokenize: the dataset has no images")
    meta = {"assign": assign, "flips": flips, "num_images": n, "content_sha256":
            content.hexdigest(), "codebook_size": int(tokenizer.quantize.codebook_size),
            "num_tokens": int(toks[0].shape[1])}
    return TokenSet(torch.cat(toks), torch.cat(labs), torch.cat(flp), meta)


def save_tokens(path: Path, ts: TokenSet) -> None:
    """Publish a token cache: one atomic safetensors file with its digest (`sftok.storage`)."""
    publish_tensors(path, {"tokens": ts.tokens, "labels": ts.labels,
                           "flipped": ts.flipped.to(torch.uint8)},
                    {"meta": json.dumps(ts.meta)}, "token cache")


def load_tokens(path: Path) -> TokenSet:
    """A token cache written by `save_tokens`; `DamagedFileError` if it is not intact."""
    t, meta = open_tensors(path, "token cache")
    return TokenSet(t["tokens"].long(), t["labels"].long(), t["flipped"].bool(),
                    json.loads(meta["meta"]))


def cached_tokens(tokenizer, tokenizer_dir: str | os.PathLike, dataset, data_key: str,
                  cache_dir: str | os.PathLike, *, flips: bool = True, assign: str = "nearest",
                  batch_size: int = 64, device=None) -> tuple[TokenSet, bool]:
    """The dataset's TokenSet from the cache, else computed and cached -> (tokens, was_cached).

    tokenizer_dir: the checkpoint directory `tokenizer` was loaded from (its model.safetensors
    keys the cache).
    """
    sha = weights_sha256(Path(tokenizer_dir) / "model.safetensors")
    path = token_cache_path(cache_dir, sha, data_key, assign, flips, batch_size)
    if path.is_file():
        try:
            return load_tokens(path), True
        except DamagedFileError as e:  # truncated, altered, or from before digests: redo it
            rebuilding(e)
    ts = pretokenize(tokenizer, dataset, flips=flips, assign=assign, batch_size=batch_size,
                     device=device)
    ts.meta.update(tokenizer_sha256=sha, tokenizer_dir=str(tokenizer_dir), data_key=data_key,
                   batch_size=batch_size)
    save_tokens(path, ts)
    return ts, False
