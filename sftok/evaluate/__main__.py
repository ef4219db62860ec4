"""`python -m sftok.evaluate CHECKPOINT ...`: evaluate a tokenizer on a dataset, print a table.

Our checkpoints (a directory from `sftok.checkpoint.save_model`: model.safetensors + config.json):

    python -m sftok.evaluate runs/.../stage2/final --steps 1 2 4 8 16

  The teacher: --teacher-weights FILE (official key layout, e.g. a trained teacher's weights or
  maskgit-vqgan-imagenet-f16-256.bin), --teacher-checkpoint DIR (save_model dir), or else the
  checkpoint config's teacher through `sftok.train.get_teacher` (cached under --cache-dir).

An imported official SFTok checkpoint with the MaskGIT-VQGAN teacher (paper Table 1: SFTok-B
rFID 1.44 at 8 steps on ImageNet val):

    python -m sftok.evaluate sftok_b.bin --official \\
        --teacher-weights maskgit-vqgan-imagenet-f16-256.bin --data imagenet=/data/imagenet --steps 8

--data: `embedded`, `NAME=PATH` or `PATH` — an image folder (an ImageNet root with val/ inside,
or the validation folder itself) or webdataset validation shards (a pattern with .tar).
rFID / IS need the Inception weights (--inception-weights or $SFTOK_INCEPTION_WEIGHTS), LPIPS
its backbone (--lpips-weights or $SFTOK_LPIPS_WEIGHTS); offline they are reported unavailable.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from sftok import run_record
from sftok.config import EVAL_METRICS, ExperimentConfig, TokenizerConfig, override, to_dict
from sftok.evaluate.evaluate import dataset_key, evaluate, format_table

ASSIGN_KEY = "tokenizer.quantizer.assign_at_inference"


def _data_overrides(item: str | None) -> dict:
    if item is None:
        return {}
    if item == "embedded":
        return {"data.source": "embedded", "data.path": None, "data.val_path": None}
    path = item.split("=", 1)[1] if "=" in item else item
    if ".tar" in path:
        return {"data.source": "webdataset", "data.path": path, "data.val_path": path}
    path = str(Path(path).expanduser())
    return {"data.source": "folder", "data.path": path, "data.val_path": None}


# CLI option -> the EvalConfig field it sets (their ranges are checked by sftok.config).
_EVAL_OPTIONS = {"--steps": "decode_steps", "--trace-steps": "trace_steps",
                 "--max-images": "max_images", "--batch-size": "batch_size"}


def check_args(args) -> str | None:
    """Everything that can be checked before loading a model or data: one message, or None."""
    from sftok.config import ConfigError, EvalConfig, check_ranges

    given = {field: getattr(args, opt[2:].replace("-", "_")) for opt, field in _EVAL_OPTIONS.items()}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    try:
        check_ranges(dataclasses.replace(EvalConfig(), **given))
    except ConfigError as e:
        opt = next(o for o, f in _EVAL_OPTIONS.items() if f == e.field)
        return f"{opt}: {e.message}"
    bad = [s for s in args.sets if "=" not in s]
    if bad:
        return f"--set {bad[0]}: expected KEY=VALUE, e.g. eval.temperature=1.0"
    ckpt = Path(args.checkpoint).expanduser()
    if args.official:
        if not ckpt.is_file():
            return (f"{ckpt}: no such file; with --official CHECKPOINT is the official SFTok "
                    "state-dict file (.bin / .safetensors)")
        if not args.teacher_weights:
            return "--official needs --teacher-weights /path/to/maskgit-vqgan-imagenet-f16-256.bin"
    else:
        from sftok.checkpoint import CONFIG, WEIGHTS

        if not ckpt.is_dir():
            hint = (" (an official SFTok file? add --official)" if ckpt.is_file() else
                    f" (a directory written by training: .../<stage>/final with {WEIGHTS} "
                    f"+ {CONFIG})")
            return f"{ckpt}: checkpoint directory not found{hint}"
        for name in (CONFIG, WEIGHTS):
            if not (ckpt / name).is_file():
                return (f"{ckpt / name}: missing; a checkpoint directory holds {WEIGHTS} + "
                        f"{CONFIG} (point at .../<stage>/final)")
    for opt, value, kind in (("--teacher-weights", args.teacher_weights, "file"),
                             ("--teacher-checkpoint", args.teacher_checkpoint, "dir"),
                             ("--inception-weights", args.inception_weights, "file"),
                             ("--lpips-weights", args.lpips_weights, "file")):
        if value and not (Path(value).expanduser().is_file() if kind == "file"
                          else Path(value).expanduser().is_dir()):
            return f"{opt} {value}: no such {'file' if kind == 'file' else 'directory'}"
    data = _data_overrides(args.data)
    if data.get("data.source") == "folder" and not Path(data["data.path"]).is_dir():
        return (f"--data {args.data}: {data['data.path']} is not a directory; give an image "
                "folder, .tar shards or 'embedded'")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out}: exists and is not a directory"
    return None


def _load(args, device):
    """-> (tokenizer, teacher, ExperimentConfig)."""
    from sftok.presets import get_preset
    from sftok.teacher import FrozenTeacher, load_frozen_teacher

    if args.official:
        from sftok.official import import_official_sftok

        tokenizer, tok_cfg = import_official_sftok(
            args.checkpoint, device=device,
            assign_at_inference=args.assign_at_inference or "nearest")
        cfg = get_preset(args.preset or "sftok-b")
        cfg = dataclasses.replace(cfg, tokenizer=tok_cfg)
    else:
        from sftok.checkpoint import load_model

        tokenizer, saved = load_model(args.checkpoint, device=device)
        if isinstance(saved, ExperimentConfig):
            cfg = saved if args.preset is None else dataclasses.replace(
                get_preset(args.preset), tokenizer=saved.tokenizer, teacher=saved.teacher)
        elif isinstance(saved, TokenizerConfig):
            cfg = dataclasses.replace(get_preset(args.preset or "tiny"), tokenizer=saved)
        else:
            sys.exit(f"{args.checkpoint}: not a tokenizer checkpoint ({type(saved).__name__})")
    sets = dict(s.split("=", 1) for s in args.sets)
    fixed = sorted(k for k in sets if k.startswith("tokenizer.") and k != ASSIGN_KEY)
    if fixed:  # the architecture comes from the checkpoint; a --set there would be ignored
        sys.exit(f"--set {', '.join(fixed)}: the tokenizer is defined by the checkpoint; only "
                 f"{ASSIGN_KEY} (--assign-at-inference) can change at evaluation")
    if args.assign_at_inference:
        sets[ASSIGN_KEY] = args.assign_at_inference
    sets.update(_data_overrides(args.data))
    sets.setdefault("data.image_size", cfg.tokenizer.image_size)
    cfg = override(cfg, sets)
    # Ids at inference: nearest code (batch-independent, our default) or the reference's Sinkhorn.
    tokenizer.quantize.cfg = cfg.tokenizer.quantizer

    if args.teacher_weights:
        teacher = load_frozen_teacher(args.teacher_weights, cfg.tokenizer.image_size,
                                      None if args.official else cfg.teacher)
    elif args.teacher_checkpoint:
        from sftok.checkpoint import load_model

        model, _ = load_model(args.teacher_checkpoint, device=device)
        teacher = model if isinstance(model, FrozenTeacher) else FrozenTeacher(
            model, cfg.tokenizer.image_size)
    else:
        from sftok.train import get_teacher

        cfg = dataclasses.replace(cfg, device=str(device))
        teacher = get_teacher(cfg, Path(args.cache_dir) / "teachers", train_if_missing=False)
    return tokenizer.to(device), teacher.to(device), cfg


def write_outputs(out: Path, result, cfg: ExperimentConfig) -> None:
    """The files a trial's run holds (sftok.run_record): config.json (the resolved config),
    eval.json (metrics, unavailable), trace.csv, grids/recon_s{S}.png."""
    out.mkdir(parents=True, exist_ok=True)
    run_record.write_config(out, to_dict(cfg))
    run_record.write_eval(out, result.metrics, result.unavailable)
    run_record.write_csv(out / run_record.TRACE_CSV, result.trace)
    run_record.write_recon_grids(out, result.grids)


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sftok.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint dir (save_model) or, with --official, an "
                                      "official SFTok state-dict file")
    p.add_argument("--official", action="store_true", help="CHECKPOINT is an official SFTok file")
    p.add_argument("--teacher-weights", help="teacher weights file in the official key layout")
    p.add_argument("--teacher-checkpoint", help="teacher checkpoint dir (save_model)")
    p.add_argument("--assign-at-inference", choices=["nearest", "sinkhorn"],
                   help="token ids at inference: nearest code (default; batch-independent) or "
                        "Sinkhorn over the batch as the reference code does")
    p.add_argument("--preset", help="preset for data/eval settings (default: the checkpoint's "
                                    "config; sftok-b with --official)")
    p.add_argument("--data", help="embedded | NAME=PATH | PATH (image folder or .tar shards)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. decode.temperature=1.0 (repeatable)")
    p.add_argument("--steps", type=int, nargs="+", help="decode steps S (default: eval config)")
    p.add_argument("--trace-steps", type=int, help="S of the Figure-4a trace (0 = none)")
    p.add_argument("--max-images", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--metrics", nargs="+", choices=EVAL_METRICS)
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=".cache", help="teacher and FID-statistics cache")
    p.add_argument("--inception-weights", help="weights-inception-2015-12-05-6726825d.pth")
    p.add_argument("--lpips-weights", help="torchvision alexnet weights file for LPIPS")
    p.add_argument("--out", help="write config.json, eval.json, trace.csv and grids/*.png here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-bounds", action="store_true",
                   help="skip the naive-codec floors and the teacher ceiling (bounds.py)")
    args = p.parse_args(argv)

    problem = check_args(args)  # before any model, weights or data is loaded
    if problem:
        return _fail(problem)

    from sftok.config import ConfigError
    from sftok.train import TeacherUnavailableError
    from sftok.train.loop import resolve_device
    from sftok.weights import WeightsFileError

    device = resolve_device(args.device)

    try:
        tokenizer, teacher, cfg = _load(args, device)
        ev = {"decode_steps": tuple(args.steps) if args.steps else None,
              "trace_steps": args.trace_steps, "max_images": args.max_images,
              "batch_size": args.batch_size,
              "metrics": tuple(args.metrics) if args.metrics else None}
        cfg = override(cfg, {f"eval.{k}": v for k, v in ev.items() if v is not None})

        from sftok.data import build_val_dataset, val_batches

        val = build_val_dataset(cfg.data)
    except TeacherUnavailableError as e:  # a clear message, not a traceback
        return _fail(f"teacher unavailable: {e} — use --teacher-weights FILE, "
                     "--teacher-checkpoint DIR, or --cache-dir pointing at the cache the "
                     "tokenizer was trained with")
    except (FileNotFoundError, WeightsFileError, ConfigError) as e:
        return _fail(str(e))
    images = val_batches(val, cfg.eval.batch_size, cfg.eval.max_images,
                         num_workers=cfg.data.num_workers)
    bounds = None
    if not args.no_bounds:
        from sftok.config import ConfigError
        from sftok.evaluate.bounds import Bounds, build_bounds

        try:
            bounds = build_bounds(cfg, Path(args.cache_dir) / "eval")
        except ConfigError as e:  # no training split to fit the floors' palettes on
            print(f"note: no naive-codec floors ({e}); the teacher ceiling is still reported",
                  file=sys.stderr)
            bounds = Bounds(ceiling=True)
    result = evaluate(tokenizer, teacher, images, cfg.eval, device=device,
                      cache_dir=Path(args.cache_dir) / "eval", inception_weights=args.inception_weights,
                      progress=not args.no_progress, decode_cfg=cfg.decode,
                      dataset_key=dataset_key(cfg), lpips_weights=args.lpips_weights,
                      bounds=bounds)
    print(format_table(result, cfg.eval.decode_steps))
    if images.summary():
        print(images.summary())
    if args.out:
        write_outputs(Path(args.out), result, cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
