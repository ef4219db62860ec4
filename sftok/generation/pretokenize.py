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
from safetensors.torch import save_file
from torch import Tensor

from sftok.data.transforms import hflip
from sftok.data.uint8 import ContentHash, to_uint8


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
    """sha256 over a safetensors file's tensors (names, dtypes, shapes, bytes) in name order.

    Not over the file's bytes: two bitwise-equal models written by different runs can differ
    in their header layout, and must share their cached tokens.
    """
    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    save_file({"tokens": ts.tokens.contiguous(), "labels": ts.labels.contiguous(),
               "flipped": ts.flipped.to(torch.uint8).contiguous()}, str(tmp),
              metadata={"meta": json.dumps(ts.meta)})
    os.replace(tmp, path)  # atomic: concurrent trials never read a half-written file


def load_tokens(path: Path) -> TokenSet:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["meta"])
        t = {k: f.get_tensor(k) for k in ("tokens", "labels", "flipped")}
    return TokenSet(t["tokens"].long(), t["labels"].long(), t["flipped"].bool(), meta)


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
        return load_tokens(path), True
    ts = pretokenize(tokenizer, dataset, flips=flips, assign=assign, batch_size=batch_size,
                     device=device)
    ts.meta.update(tokenizer_sha256=sha, tokenizer_dir=str(tokenizer_dir), data_key=data_key,
                   batch_size=batch_size)
    save_tokens(path, ts)
    return ts, False
