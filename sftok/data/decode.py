"""Decoding image files, and the corrupt-file policy shared by folders and shards.

Policy (issue 3): a file that cannot be decoded is skipped, counted, and reported once; the
training run goes on. `SkipLog` holds the count and the first offending path; it warns with a
`CorruptImageWarning` the first time only, so a dataset with thousands of bad files does not
flood the log. Counts live in the process that decoded the file: with DataLoader workers each
worker keeps (and reports) its own.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image

# PIL raises these for truncated, garbage or unsupported bytes (SyntaxError: some broken PNGs).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class CorruptImageWarning(UserWarning):
    """An image could not be decoded and was skipped."""


class SkipLog:
    """Counts undecodable files; warns once, on the first one."""

    def __init__(self, what: str, consequence: str = "training goes on"):
        self.what = what  # e.g. "data.path /data/imagenet/train"
        self.consequence = consequence  # what happens instead, e.g. "it is left out"
        self.count = 0
        self.first: str | None = None
        self._seen: set[str] = set()

    def record(self, name: str, error: BaseException) -> None:
        if name in self._seen:  # the same file met again (next epoch) is not a new skip
            return
        self._seen.add(name)
        self.count += 1
        if self.first is None:
            self.first = name
            warnings.warn(
                f"skipping an image that cannot be decoded: {name} ({type(error).__name__}: "
                f"{error}); {self.consequence}. Further undecodable files in {self.what} are "
                f"skipped silently and counted.",
                CorruptImageWarning, stacklevel=3)

    def report(self) -> str | None:
        """One line summarising the skips so far (None when there were none)."""
        if not self.count:
            return None
        return f"{self.count} undecodable image(s) skipped in {self.what} (first: {self.first})"


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes to an RGB PIL image; raises one of DECODE_ERRORS."""
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(fp) as img:
        img.load()  # force full decoding now, so truncated files fail here and not later
        if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):
            # Composite on white rather than dropping alpha: transparent pixels often hold junk.
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, img).convert("RGB")
        return img.convert("RGB")
