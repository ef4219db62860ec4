#!/usr/bin/env python3
"""Train a preset's VQGAN teacher (stage 0) with its learning curve; optionally ship it.

    python dev.py exec python scripts/train_teacher.py --preset tiny --out DIR [--set k=v ...]
        [--curve-every 1000] [--threads 1] [--ship NAME]

Trains stage 0 of the resolved config (`sftok.train.teacher_stage.train_teacher`, the same code
`teacher.source: train` runs inside a campaign) into DIR: periodic checkpoints under DIR/train/
(the same command resumes after a kill), the learning curve in DIR/curve.json (held-out and
training-image PSNR every --curve-every steps, readable while it runs), and at the end the
weights DIR/model.safetensors, DIR/config.json and the record DIR/teacher.json.

--ship NAME then copies the finished teacher into the package (`sftok/released/NAME/`:
weights, manifest with config, command, curve and sha256; `sftok.released`), where a preset
with `teacher.source: shipped` and `teacher.shipped: NAME` loads it. This is how the `tiny`
teacher was made (its manifest records the exact command).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (YAML value), e.g. train.teacher.steps=20000")
    p.add_argument("--out", required=True, type=Path, help="training directory (resumable)")
    p.add_argument("--curve-every", type=int, default=1000,
                   help="steps between learning-curve points (a multiple of log_every)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--ship", metavar="NAME", default=None,
                   help="when finished, copy the teacher into sftok/released/NAME/")
    p.add_argument("--no-resume", action="store_true",
                   help="discard DIR/train/ checkpoints and start from step 0")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from sftok.config import ConfigError, override, validate
    from sftok.presets import get_preset
    from sftok.released.ship import heldout_bounds, ship_teacher
    from sftok.train.teacher_stage import load_cached_teacher, train_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        overrides = dict(s.split("=", 1) for s in args.sets)
    except ValueError:
        sys.exit(f"--set takes KEY=VALUE, got {args.sets}")
    try:
        cfg = override(get_preset(args.preset), overrides)
        validate(cfg)
    except (ConfigError, KeyError) as e:
        sys.exit(f"config error: {e}")
    log_every = cfg.train.teacher.log_every
    if args.curve_every <= 0 or args.curve_every % log_every:
        sys.exit(f"--curve-every must be a positive multiple of train.teacher.log_every "
                 f"({log_every}), got {args.curve_every}")

    def show(step: int, m: dict[str, float]) -> None:
        if "loss" in m and step % (10 * log_every) == 0:
            print(f"step {step}/{cfg.train.teacher.steps} loss {m['loss']:.4f} "
                  f"psnr {m.get('psnr', float('nan')):.2f} img/s {m['images_per_s']:.1f}",
                  flush=True)

    record = train_teacher(cfg, args.out, callback=show, resume=not args.no_resume,
                           curve_every=args.curve_every)
    for p in record.get("curve", []):
        print(f"curve step {p['step']}: held-out {p['val_psnr']:.2f} dB, train "
              f"{p['train_psnr']:.2f} dB (gap {p['gap_db']:+.2f})", flush=True)
    print(f"finished: {record['steps']} steps, held-out PSNR {record['val_psnr']:.2f} dB, "
          f"{record['train_time_s']:.0f} s in this process", flush=True)
    if args.ship:
        # The command that trained it: these arguments minus --ship (shipping changes nothing
        # about the weights; rerunning the command reproduces them).
        argv_train = [a for i, a in enumerate(argv)
                      if a != "--ship" and not (i and argv[i - 1] == "--ship")
                      and not a.startswith("--ship=")]
        command = " ".join(["python", "scripts/train_teacher.py", *map(shlex.quote, argv_train)])
        teacher = load_cached_teacher(cfg, args.out)
        bounds = heldout_bounds(cfg, teacher, cache_dir=args.out / "floors")
        print("held-out, 8-bit: " + ", ".join(f"{k} {v:.2f} dB" for k, v in bounds.items()),
              flush=True)
        dest = ship_teacher(args.out, args.ship, cfg, command=command, extra=bounds)
        print(f"shipped: {dest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
