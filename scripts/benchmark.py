"""Benchmark the tokenizer of each preset on this machine (not a test).

Prints parameter counts (encoder / quantizer / decoder, plus the stage-3 pixel decoder and the
teacher, counted on the `meta` device) and wall-clock times of: encode (images -> ids), one
decoder pass (logits for an all-masked grid), and S-step decoding (`SFTok.generate`), at batch
size B with random weights (speed does not depend on the weights).

Then, unless `--no-train`, training-step throughput (images/s) per stage (0 = teacher,
1-3 = SFTok stages) at each preset's own batch size (`sftok.train.benchmark`); paper presets
only on a GPU (`--train-presets` to choose).

`--teacher-share PRESET...`: the teacher's measured share of a stage-2 step, and the step time
with its ids looked up from a cache instead (`sftok.train.teacher_ids`), per preset
(`--teacher-batch`, default 2: sftok-b at batch 1-2 runs on a CPU).

`--campaign`: the cost of a campaign with and without shared stage results (issue 10): runs the
Table 4 spec (`ablation_replace_ratio`, `--campaign-preset`, `--campaign-seeds`) twice in this
process, back to back, in fresh work dirs (teacher and its id cache prepared beforehand, not
timed), unshared first, and prints stage results and stage-steps trained / reused, wall time of
each, their ratio, and the load average around each run (timings on a shared machine are only
comparable under the same load).

    python scripts/benchmark.py                      # all presets
    python scripts/benchmark.py --presets smoke tiny --batch 8 --device cuda
    python scripts/benchmark.py --no-models --teacher-share tiny small sftok-b
    python scripts/benchmark.py --no-models --campaign --campaign-preset tiny --campaign-seeds 3
    python scripts/benchmark.py --presets sftok-b --train-presets sftok-b sftok-l --json b.json
"""
from __future__ import annotations

import argparse
import json

import torch

from sftok.presets import PRESETS, get_preset
from sftok.teacher import MaskGitVQGAN
from sftok.train.benchmark import build_random, throughput_record, time_inference


def count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=None, help="S (default: the preset's decode.steps)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--big-reps", type=int, default=1,
                    help="repetitions for models over 50M parameters on CPU (no warm-up)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-train", action="store_true", help="skip the training throughput table")
    ap.add_argument("--train-presets", nargs="+", default=None, choices=list(PRESETS),
                    help="presets for the training table (default: smoke tiny small on CPU, "
                         "all on GPU)")
    ap.add_argument("--train-steps", type=int, default=5, help="timed steps per stage")
    ap.add_argument("--no-models", action="store_true",
                    help="skip the model and training tables (e.g. with --campaign)")
    ap.add_argument("--teacher-share", nargs="+", default=[], choices=list(PRESETS),
                    metavar="PRESET", help="measure the teacher's share of a stage-2 step")
    ap.add_argument("--teacher-batch", type=int, default=2)
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 for --teacher-share on a "
                                                "shared machine: it times CPU seconds)")
    ap.add_argument("--teacher-steps", type=int, default=3, help="timed steps (median)")
    ap.add_argument("--campaign", action="store_true",
                    help="Table 4 campaign with and without shared stage results")
    ap.add_argument("--campaign-preset", default="tiny", choices=list(PRESETS))
    ap.add_argument("--campaign-seeds", type=int, default=3)
    ap.add_argument("--campaign-dir", help="where the two campaigns run (default: a temp dir)")
    ap.add_argument("--json", metavar="PATH", help="also write the training rows as JSON "
                    "(the input of analysis/table5_compute.py: -p benchmark_json=PATH)")
    args = ap.parse_args()
    device = torch.device(args.device)
    amp = args.dtype == "bf16"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.teacher_share:
        teacher_share_table(args, device)
    if args.campaign:
        campaign_table(args.campaign_preset, args.campaign_seeds, args.campaign_dir)
    if args.no_models:
        return

    print(f"device={device} ({torch.get_num_threads()} CPU threads) batch={args.batch} "
          f"dtype={args.dtype} torch={torch.__version__}")
    if device.type == "cuda":
        print(f"gpu={torch.cuda.get_device_name(device)}")
    head = (f"{'preset':8} {'enc M':>7} {'quant M':>7} {'dec M':>7} {'pix M':>7} {'teach M':>7} "
            f"{'encode s':>9} {'1 pass s':>9} {'S':>3} {'S-step s':>9}")
    print(head)
    print("-" * len(head))
    for name in args.presets:
        cfg = get_preset(name)
        meta = build_random(cfg, "meta", finetune=True)
        with torch.device("meta"):
            teacher = MaskGitVQGAN(cfg.teacher)
        params = [count(meta.encoder), count(meta.quantize), count(meta.decoder),
                  count(meta.pixel_quantize) + count(meta.pixel_decoder), count(teacher)]
        del meta, teacher

        steps = args.steps or cfg.decode.steps
        t_enc, t_dec, t_gen = time_preset(name, device, args.batch, steps, args.reps,
                                          args.big_reps, amp)
        print(f"{name:8} " + " ".join(f"{p / 1e6:7.3f}" for p in params)
              + f" {t_enc:9.4f} {t_dec:9.4f} {steps:3d} {t_gen:9.4f}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not args.no_train:
        train_table(args, device)


def train_table(args: argparse.Namespace, device: torch.device) -> None:
    """Training-step throughput per stage and preset (random weights and images)."""
    from sftok.train.benchmark import benchmark_training, format_table

    default = list(PRESETS) if device.type == "cuda" else ["smoke", "tiny", "small"]
    rows = []
    for name in args.train_presets or default:
        rows += benchmark_training(get_preset(name), steps=args.train_steps, device=str(device))
    print("\ntraining throughput (fp32 on CPU; the preset's precision on GPU)")
    print(format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(throughput_record(rows, device), f, indent=1)
        print(f"wrote {args.json}")


def teacher_share_table(args: argparse.Namespace, device: torch.device) -> None:
    from sftok.train.benchmark import teacher_flop_share, teacher_share

    print(f"\nteacher share of a stage-2 step (random weights, batch {args.teacher_batch}, "
          f"median of {args.teacher_steps} interleaved rounds, {torch.get_num_threads()} "
          f"thread(s), {'CPU seconds' if device.type == 'cpu' else 'wall seconds'}; load "
          f"average {_load()})")
    print("| preset | batch | teacher s | step s (encode) | step s (cached ids) | share | "
          "speedup | FLOP estimate: teacher / step GFLOP per image, share |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in args.teacher_share:
        r = teacher_share(get_preset(name), steps=args.teacher_steps, device=str(device),
                          batch_size=args.teacher_batch)
        f = teacher_flop_share(get_preset(name))
        print(f"| {name} | {r['batch']} | {r['teacher_s']:.3f} | {r['step_s']:.3f} | "
              f"{r['cached_step_s']:.3f} | {r['share']:.1%} | {r['speedup']:.2f}x | "
              f"{f['teacher_gflop']:.2f} / {f['step_gflop']:.1f}, {f['share']:.1%} |",
              flush=True)
    print(f"(load average after: {_load()})")


def _load() -> str:
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def campaign_table(preset: str, seeds: int, where: str | None) -> None:
    """Table 4 without and with shared stage results, back to back (see the module doc)."""
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "experiments"))
    from sftok_experiments.campaign import Options, run_campaign
    from sftok_experiments.expand import expand
    from sftok_experiments.spec import load_spec

    from sftok.data import build_train_dataset
    from sftok.train import get_teacher
    from sftok.train.teacher_ids import TeacherIdCache
    from sftok.train.teacher_stage import teacher_identity

    spec, path = load_spec("ablation_replace_ratio")
    plan = expand(spec, path, preset=preset, seeds=seeds)
    base = Path(where) if where else Path(tempfile.mkdtemp(prefix="sftok-campaign-bench-"))
    cache = base / "cache"
    cfg = plan.trials[0].config
    teacher = get_teacher(cfg, cache / "teachers")  # untimed: both campaigns load it
    TeacherIdCache.load_or_build(teacher, build_train_dataset(cfg.data),
                                 cache / "teachers" / "ids", teacher_identity(cfg))
    rows = []
    for share in (False, True):
        before = _load()
        res = run_campaign(plan, Options(tracking=str(base / "mlruns"),
                                         work_dir=str(base / ("shared" if share else "unshared")),
                                         cache_dir=str(cache), share_stages=share,
                                         echo=lambda *a, **k: None))
        if not res.ok:
            raise SystemExit(f"campaign (share={share}) failed: "
                             + "; ".join(f"{t.key}: {t.status} {t.error or ''}"
                                         for t in res.trials))
        rows.append((share, res, before, _load()))
    print(f"\nTable 4 campaign ({preset}, {seeds} seed(s), {len(plan.trials)} trials) in {base}")
    print("| stage results | trained | reused | stage-steps trained | reused | wall s | "
          "load avg before | after |\n|---|---|---|---|---|---|---|---|")
    for share, res, before, after in rows:
        print(f"| {'shared' if share else 'per trial'} | {res.stage_count('trained')} | "
              f"{res.stage_count('reused')} | {res.stage_count('trained', steps=True)} | "
              f"{res.stage_count('reused', steps=True)} | {res.wall_s:.0f} | {before} | "
              f"{after} |")
    (_, off, _, _), (_, on, _, _) = rows
    same = all(a.metrics == b.metrics for a, b in zip(off.trials, on.trials))
    print(f"wall-time ratio shared / per trial: {on.wall_s / off.wall_s:.2f}; stage-steps "
          f"ratio: {on.stage_count('trained', True) / off.stage_count('trained', True):.2f}; "
          f"eval metrics identical in every trial: {same}", flush=True)


def time_preset(name: str, device: torch.device, batch: int, steps: int, reps: int,
                big_reps: int, amp: bool) -> tuple[float, float, float]:
    """(encode, one decoder pass, S-step decode) seconds for a randomly initialised model."""
    cfg = get_preset(name)
    total = count(build_random(cfg, "meta"))
    if device.type == "cpu" and total > 50e6:  # minutes per rep on a laptop CPU: no warm-up
        reps, warmup = big_reps, 0
    else:
        warmup = 1
    t = time_inference(cfg, device, batch, steps, reps, warmup, amp)
    return t["encode_s"], t["pass_s"], t["decode_s"]


if __name__ == "__main__":
    main()
