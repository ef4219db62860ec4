"""Content-addressed stage results: each distinct stage result is trained once per work dir.

A stage's result is named by everything it depends on (`sftok.train.stages.stage_identity`:
its resolved config, the model / data / teacher configs, the seed, the key of the result it
starts from, the library's source digest). Trials that need the same result — Table 4's arms
share stage 1; a step sweep or a re-run after changing stage 2 shares more — start from the one
copy instead of training it again, within a campaign and across campaigns that use the same
work directory.

Layout under the store root (`<work dir>/stages/`):

    <key>/              a published result: model.safetensors + config.json (sftok.checkpoint),
                        stage.json (steps, last metrics, every logged window), identity.json,
                        digests.json (bytes + sha256 of each of those files, written last).
                        It appears by one rename of a complete directory: never half written.
    .building/<key>/    a result being trained: `train_stage`'s periodic checkpoints + final/.
                        A trainer killed mid-stage leaves it; the next trainer resumes from it.
    .locks/<key>.lock   held (flock) by the one process training <key>; others wait on it.
    .damaged/           results whose files no longer match their digests, moved out of the
                        way (kept for a look; the result is trained again).

Storage faults (`sftok.storage`): a result is checked against its digests whenever a trial
takes it (sizes, then sha256), so a truncated or altered file is never used: the result is
moved to `.damaged/` with one line and trained again. A full disk while training or publishing
stops the trial with one line naming the path (`StorageFullError`); the half-written temporary
files are removed, the periodic checkpoints kept, so `--resume` after freeing space continues
from the last one.

Stale locks recover by themselves: an flock belongs to the open file, so the kernel releases it
when its holder exits or is killed (a Ray retry, SIGKILL, a lost node's process). The file
names the last holder (pid, host, time) for the waiting message only. Locks are only as good as
the file system's flock: local disks and NFSv4 are fine; a store on storage without working
locks (some FUSE mounts) may train a result twice, but never publishes a torn one.

Deadlock: a trial holds at most one lock at a time (stages are obtained one after another and
the lock is dropped once the result is published), and the holder only trains, so waiting
always ends. On one CPU Ray runs one trial at a time and nobody waits at all. Ordering keeps
waiting rare: `expand` lists trials arm-major, seed-minor, so trials started together usually
have different seeds and so different stage-1 results.

Each child run still shows its stage curves: a reused result's logged windows (stage.json
`history`, the same dicts the training callback received) are replayed through the trial's
callback (or its `replay_callback`) at the same global steps; a trainer that resumes someone
else's partial result first replays the windows logged before its checkpoint.

A trial's finished stages also travel in its Ray checkpoints (`snapshot`: `<stage>/final` +
`key.txt`), so a retry on a node without this store publishes them again (`restore`).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftok.filelock import announced_lock
from sftok.storage import (
    DamagedFileError,
    StorageFullError,
    record_digests,
    set_aside,
    verify_digests,
    writing,
)
from sftok.train.checkpointing import FINAL  # a stage's finished result: <out dir>/final

TRAINED, REUSED = "trained", "reused"
STAGE_JSON = "stage.json"  # written by sftok.train.loop.run_loop into final/
DIGESTS = "digests.json"  # bytes + sha256 of a result's files, written last (sftok.storage)
KEY_FILE = "key.txt"  # a snapshot's <stage>/key.txt beside <stage>/final


@dataclass
class StageOutcome:
    """One stage of one trial: where its result lives and whether this trial trained it."""

    stage: str
    key: str
    checkpoint: Path  # the result dir: model.safetensors + config.json + stage.json
    steps: int
    source: str  # TRAINED (this call trained or finished it) or REUSED (it was published)


def replay(history: list[dict[str, float]], callback, step_offset: int) -> None:
    """Send logged windows (rows {"step": n, name: value}) to callback(offset + n, metrics)."""
    if callback is None:
        return
    for row in history:
        callback(step_offset + int(row["step"]), {k: v for k, v in row.items() if k != "step"})


class StageStore:
    """The stage results under `root` (see the module docstring for the layout)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # --- reading ------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.root / key

    def is_published(self, key: str) -> bool:
        """Is `key` published (its digests, written last, present)? No file is checked."""
        return (self.path(key) / DIGESTS).is_file()

    def published(self, key: str, echo: Callable[[str], None] | None = print
                  ) -> dict[str, Any] | None:
        """The published result's stage.json (steps, metrics, history), or None: not published,
        or damaged (moved to `.damaged/`, said through `echo`, to be trained again)."""
        d = self.path(key)
        if not d.exists():
            return None
        try:
            verify_digests(d, self._digests(d), f"stage result {key}")
            return json.loads((d / STAGE_JSON).read_text())
        except DamagedFileError as e:
            moved = set_aside(d, self.root)
            if echo is not None:
                echo(f"warning: {e}; moved to {moved}, training it again")
            return None

    @staticmethod
    def _digests(d: Path) -> dict[str, Any]:
        try:
            return json.loads((d / DIGESTS).read_text())
        except (OSError, ValueError):  # missing, truncated: nothing to trust the files by
            return {}

    # --- obtaining ------------------------------------------------------------------------------

    def obtain(self, cfg, stage: str, teacher, init: StageOutcome | None = None,
               callback: Callable[[int, dict[str, float]], None] | None = None,
               step_offset: int = 0, echo: Callable[[str], None] | None = None,
               train_fn: Callable[..., Any] | None = None,
               id_cache_dir: Path | None = None,
               replay_callback: Callable[[int, dict[str, float]], None] | None = None
               ) -> StageOutcome:
        """The result of `stage` for `cfg` starting from `init`: reused if published, else
        trained here (under the key's lock, resuming a partial one) and published.

        callback(global step, metrics) sees the stage's curve either way: the windows trained
        here live, those trained before replayed (through `replay_callback` when given).
        train_fn: `sftok.train.train_stage` (replaceable in tests); id_cache_dir: its
        teacher-id cache directory.
        """
        from sftok.train.stages import stage_identity, stage_key

        replay_callback = replay_callback or callback

        identity = stage_identity(cfg, stage, init.key if init is not None else None)
        key = stage_key(identity)
        meta = self.published(key, echo)
        source = REUSED
        if meta is None:
            with self._lock(key, echo):
                meta = self.published(key, echo)  # someone else finished it while we waited
                if meta is None:
                    meta = self._train(cfg, stage, teacher, key, identity, init, callback,
                                       replay_callback, step_offset, train_fn, id_cache_dir)
                    source = TRAINED
        if source == REUSED:
            replay(meta.get("history", []), replay_callback, step_offset)
        return StageOutcome(stage, key, self.path(key), int(meta["steps"]), source)

    def _train(self, cfg, stage, teacher, key, identity, init, callback, replay_callback,
               step_offset, train_fn, id_cache_dir) -> dict[str, Any]:
        from sftok.train import checkpointing as ckpt
        from sftok.train.loop import read_final

        if train_fn is None:
            from sftok.train import train_stage as train_fn
        building = self.root / ".building" / key
        # Windows logged before a partial result's checkpoint were reported to whoever trained
        # them; replay them so this trial's run shows the whole curve.
        done = read_final(building)
        latest = ckpt.latest_checkpoint(building)
        if done is not None:
            replay(done.history, replay_callback, step_offset)
        elif latest is not None:
            history = json.loads((latest / "state.json").read_text()).get("history", [])
            replay(history, replay_callback, step_offset)
        what = f"stage result {key} (training checkpoints and final model)"
        try:
            with writing(building, what):
                train_fn(cfg, stage, teacher, building, init=init.checkpoint if init else None,
                         callback=callback, resume=True, step_offset=step_offset,
                         id_cache_dir=id_cache_dir)
                self.publish(key, building / FINAL, identity)
        except StorageFullError:
            ckpt.remove_temporaries(building)  # checkpoints stay: --resume continues from them
            raise
        shutil.rmtree(building, ignore_errors=True)
        return self.published(key)

    def publish(self, key: str, result: Path, identity: dict[str, Any] | None = None) -> Path:
        """Publish a finished result directory (its files written) as `key`: identity.json,
        then digests.json, then one rename, so the result appears complete or not at all."""
        if identity is not None:
            (result / "identity.json").write_text(json.dumps(identity, indent=1, default=str))
        (result / DIGESTS).write_text(json.dumps(record_digests(result), indent=1))
        self.root.mkdir(parents=True, exist_ok=True)
        os.rename(result, self.path(key))
        return self.path(key)

    def restore(self, snapshot_dir: Path, work: Path | None = None) -> None:
        """Publish the finished stages of a `snapshot` (a retry's Ray checkpoint): a
        content-addressed one into this store, one without a key (e.g. the generator) back
        into `work/<stage>/final`."""
        for stage_dir in Path(snapshot_dir).iterdir():
            key_file = stage_dir / KEY_FILE
            if not (stage_dir / FINAL).is_dir():
                continue
            if key_file.exists():
                self.adopt(key_file.read_text().strip(), stage_dir / FINAL)
            elif work is not None and not (work / stage_dir.name / FINAL).exists():
                (work / stage_dir.name).mkdir(parents=True, exist_ok=True)
                shutil.copytree(stage_dir / FINAL, work / stage_dir.name / FINAL)

    def adopt(self, key: str, source_dir: Path) -> None:
        """Publish a copy of a finished result (e.g. from a Ray checkpoint on another node)."""
        if self.published(key) is not None:
            return
        tmp = self.root / ".building" / f".adopt-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with writing(tmp, f"a copy of stage result {key}"):
                shutil.copytree(source_dir, tmp)
            # The copy must match the digests recorded when the result was first published.
            verify_digests(tmp, self._digests(tmp), f"copy of stage result {key}")
            with self._lock(key, None):
                if self.published(key) is None:
                    os.rename(tmp, self.path(key))
        except DamagedFileError as e:  # not adopted: the trial trains the stage instead
            print(f"warning: {e}; not used, the stage is trained again", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- locking ------------------------------------------------------------------------------

    def _lock(self, key: str, echo: Callable[[str], None] | None):
        """Exclusive lock on .locks/<key>.lock; says once whom it waits for."""
        return announced_lock(self.root / ".locks" / f"{key}.lock", on_wait=None if echo is None
                              else lambda holder: echo(f"waiting for stage result {key} (being "
                                                       f"trained by {holder})"))


def snapshot(outcomes: list[StageOutcome], tmp: Path) -> Path:
    """A directory of the finished stages for a Ray checkpoint, under `tmp`:
    `<stage>/final` (+ `<stage>/key.txt` when the result is content-addressed)."""
    snap = tmp / f"snapshot-{len(outcomes)}"
    with writing(snap, "the trial's snapshot of its finished stages"):
        for o in outcomes:
            shutil.copytree(o.checkpoint, snap / o.stage / FINAL)
            if o.key:
                (snap / o.stage / KEY_FILE).write_text(o.key)
    return snap


__all__ = ["DIGESTS", "REUSED", "TRAINED", "StageOutcome", "StageStore", "replay", "snapshot"]
