"""The command line of `python experiments/run.py` (see `--help`)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import webbrowser
from pathlib import Path

from sftok import run_record as rr
from sftok_experiments.spec import SpecError, list_specs, load_spec

USAGE = """\
python experiments/run.py SPEC [--preset NAME] [--seeds N] [--set key=value ...]
                          [--data imagenet=PATH] [--tracking-uri URI] [--ray-address ADDR]
                          [--cpus-per-trial N] [--gpus-per-trial F] [--device auto|cpu]
                          [--max-concurrent N]
                          [--resume] [--dry-run [--verbose]] [--yes]
python experiments/run.py --list
python experiments/run.py ui [--tracking-uri URI] [--port 5000] [--campaign ID]
                             [--experiment SPEC] [--no-browser] [--print]
python experiments/run.py snapshot [--remote NAME]"""

EPILOG = """\
SPEC is a spec name (experiments/specs/NAME.yaml) or a path to a YAML spec.
Examples:
  python experiments/run.py ablation_replace_ratio                 # Table 4, tiny preset, CPU
  python experiments/run.py ablation_replace_ratio --preset smoke --seeds 1
  python experiments/run.py step_sweep --set train.stage2.steps=600 --dry-run
  python experiments/run.py ablation_replace_ratio --preset sftok-b --data imagenet=/data/imagenet \\
      --gpus-per-trial 1 --cpus-per-trial 8 --ray-address auto
  python experiments/run.py ablation_replace_ratio --resume         # continue an interrupted run
A plan of more than 50 trials is printed as a summary (--verbose: every trial); one of more
than the spec's max_trials (default 100) asks for --yes before any compute.
Every trial is a child run of the invocation's parent run in MLflow (store ./mlruns by default:
SQLite mlruns/mlflow.db + mlruns/artifacts/); browse it with `python experiments/run.py ui`."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/run.py", usage=USAGE, epilog=EPILOG,
                                allow_abbrev=False,  # resume_command rewrites exact names
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Run an SFTok experiment spec: Ray Tune trials "
                                            "tracked in MLflow.")
    p.add_argument("spec", nargs="?", help="spec name or path")
    p.add_argument("--list", action="store_true", help="list the shipped specs and exit")
    p.add_argument("--preset", help="preset (default: the spec's): smoke, tiny, small, "
                                    "sftok-b, sftok-l")
    p.add_argument("--seeds", type=int, help="run seeds 0..N-1 (default: the spec's seeds)")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE", default=[],
                   help="override any config field, e.g. train.stage2.steps=100 (repeatable)")
    p.add_argument("--data", action="append", metavar="NAME=PATH", default=[],
                   help="dataset: imagenet=/path (image folder with train/ val/) or a "
                        "webdataset pattern with .tar; 'embedded' for the built-in photos")
    p.add_argument("--tracking-uri", help="MLflow store: a directory (default ./mlruns) or URI")
    p.add_argument("--ray-address", help="attach to an existing Ray cluster (e.g. auto)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPU share per trial: 1 per trial for paper presets, a fraction "
                        "(e.g. 0.25) packs small-preset trials onto one GPU")
    p.add_argument("--device", choices=("auto", "cpu"),
                   help="trials' device (default: the config's, auto): auto = the GPU Ray "
                        "assigned the trial, CPU without a GPU share, and an error naming the "
                        "node if the trial has a share but no CUDA; cpu = CPU even with a share")
    p.add_argument("--max-concurrent", type=int, help="max trials running at once")
    p.add_argument("--max-failures", type=int, help="retries of a crashed trial (default: spec)")
    p.add_argument("--resume", action="store_true",
                   help="continue the latest invocation of the same campaign: skip finished "
                        "trials, continue the others from their checkpoints (exit 2, listing "
                        "the spec's recent runs, if there is none)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the trials (above 50: a summary) and the stage results they "
                        "train and reuse, and exit")
    p.add_argument("--verbose", action="store_true",
                   help="list every trial, however many (default: a summary above 50)")
    p.add_argument("--yes", action="store_true",
                   help="run a campaign of more trials than the spec's max_trials (default "
                        "100) without asking")
    p.add_argument("--work-dir", help="campaign working dirs (default ./runs)")
    p.add_argument("--cache-dir", help="teacher / FID-statistics cache (default ./.cache)")
    p.add_argument("--no-share-stages", action="store_true",
                   help="train every stage in every trial instead of reusing identical stage "
                        "results from <work dir>/stages (for timing comparisons)")
    p.add_argument("--progress-every", type=float, default=30.0, metavar="SECONDS",
                   help="a progress line per running trial at most this often (default 30; "
                        "-1: none)")
    # Tests and plugins: a replacement trial function, "path/to/file.py:function" or "mod:fn".
    p.add_argument("--trial-fn", help=argparse.SUPPRESS)
    p.add_argument("--no-teacher", action="store_true", help=argparse.SUPPRESS)
    return p


# Options resume_command replaces by the values actually used, and flags it drops.
_STORE_OPTIONS = ("--tracking-uri", "--work-dir", "--cache-dir")
_DROPPED_FLAGS = ("--resume", "--dry-run")


def resume_command(argv: list[str], tracking_uri: str, work_dir: Path, cache_dir: Path) -> str:
    """The command that continues this invocation: the same arguments, the store, work and cache
    directories actually used (absolute, so it works from any directory), and --resume."""
    out, skip_value = [], False
    for a in argv:
        if skip_value:
            skip_value = False
            continue
        name = a.split("=", 1)[0]
        if name in _STORE_OPTIONS:
            skip_value = "=" not in a
            continue
        if a not in _DROPPED_FLAGS:
            out.append(a)
    out += ["--tracking-uri", tracking_uri, "--work-dir", str(work_dir),
            "--cache-dir", str(cache_dir), "--resume"]
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith("run.py") else "experiments/run.py"
    return " ".join(shlex.quote(c) for c in ["python", script, *out])


def confirm_size(plan, yes: bool) -> bool:
    """May a campaign of `plan.size` trials start? Up to the spec's `max_trials`: yes. Above:
    with --yes, or when the user answers yes on a terminal; otherwise one line and no."""
    limit = plan.spec.max_trials
    if plan.size <= limit or yes:
        return True
    question = (f"{plan.size:,} trials is more than this spec's max_trials ({limit:,}); "
                "nothing has run yet")
    if sys.stdin.isatty():
        try:
            answer = input(f"{question}. Run them? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() in ("y", "yes"):
            return True
    print(f"error: {question}: pass --yes to run them (or set max_trials in the spec; "
          "--dry-run summarises them)", file=sys.stderr)
    return False


def _load_trial_fn(ref: str):
    target, _, name = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).resolve()
        mod_name = f"_sftok_trial_fn_{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(module)  # workers need not import the file
    else:
        module = importlib.import_module(target)
    return getattr(module, name)


def cmd_ui(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="experiments/run.py ui",
        description="The MLflow UI on the store, opened on the view that compares the arms of "
                    "a campaign: its child runs grouped by arm (metrics averaged over seeds, "
                    "each seed's row under its arm), with the summary's metric columns, the "
                    "floors and the ceiling.")
    p.add_argument("--tracking-uri", help="the store (default ./mlruns)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--campaign", help="a parent run id or campaign hash (default: the newest "
                                      "campaign of the store)")
    p.add_argument("--experiment", metavar="SPEC",
                   help="the newest campaign of this spec's experiment")
    p.add_argument("--no-browser", action="store_true",
                   help="print the address, open no browser")
    p.add_argument("--print", action="store_true",
                   help="print the server's command and the address, start nothing")
    a = p.parse_args(argv)
    store = rr.store_location(a.tracking_uri)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "ui", "--backend-store-uri", store.uri,
           "--host", "127.0.0.1", "--port", str(a.port), "--workers", "1"]
    if store.artifact_root:
        cmd += ["--default-artifact-root", store.artifact_root]
    base = f"http://127.0.0.1:{a.port}"
    try:
        url, what = _comparison(store, base, a.campaign, a.experiment)
    except LookupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    print(f"{what}:\n  {url}", flush=True)
    if a.print:
        return 0
    print(f"MLflow UI on {base} (Ctrl-C to stop)", flush=True)
    server = subprocess.Popen(cmd)
    # `kill` stops the server too (Ctrl-C reaches it with the terminal's process group).
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    if not a.no_browser and _can_open_browser():
        threading.Thread(target=_open_when_up, args=(base, url), daemon=True).start()
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        server.wait(timeout=30)
        return 0


def _comparison(store, base: str, campaign: str | None, experiment: str | None
                ) -> tuple[str, str]:
    """(address, what it shows) for `run.py ui`: the comparison view of the chosen campaign
    (the newest by default), the UI's start page in a store without campaigns. LookupError:
    the campaign or experiment asked for is not there."""
    from sftok_experiments import tracking as trk

    asked = " ".join(filter(None, [campaign, experiment and f"of spec {experiment}"]))
    if store.directory is not None and not (store.directory / rr.DB_FILE).exists():
        if asked:
            raise LookupError(f"no MLflow store at {store.directory}")
        return base, f"no campaign in {store.directory} yet: the UI's start page"
    client = trk.client_for(store.uri)
    found = trk.find_campaign(client, campaign, experiment)
    if found is None:
        if asked:
            raise LookupError(f"no campaign {asked} in {store.uri} (`python experiments/run.py "
                              "ui` without --campaign / --experiment opens the newest)")
        return base, f"no campaign in {store.uri} yet: the UI's start page"
    exp_id, parent = found
    tags = parent.data.tags
    what = (f"the arms of campaign {parent.info.run_id} (spec {tags.get(rr.SPEC_TAG, '?')}, "
            f"{tags.get(rr.N_TRIALS_TAG, '?')} trials, {parent.info.status})")
    try:
        key = trk.comparison_of(client, exp_id, parent)
    except Exception as e:  # noqa: BLE001 — e.g. a read-only store without the view
        return rr.comparison_address(base, exp_id), (
            f"{what}, without its comparison view (it could not be written to the store: "
            f"{' '.join(str(e).split())[:300]}): the experiment's runs")
    return rr.comparison_address(base, exp_id, key), what


def _can_open_browser() -> bool:
    """A browser can be opened: a desktop session (not a bare SSH login or a container)."""
    return sys.platform in ("darwin", "win32") or bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _open_when_up(base: str, url: str, timeout: float = 60.0) -> None:
    """Open `url` in the desktop's browser once the server answers at `base`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base, timeout=2).close()
            webbrowser.open(url)
            return
        except OSError:
            time.sleep(0.5)


def cmd_snapshot(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="experiments/run.py snapshot")
    p.add_argument("--store", default="mlruns")
    p.add_argument("--remote", help="DVC remote to push to")
    a = p.parse_args(argv)
    from sftok_experiments.dvc import snapshot

    return snapshot(a.store, a.remote)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "ui":
        return cmd_ui(argv[1:])
    if argv and argv[0] == "snapshot":
        return cmd_snapshot(argv[1:])
    args = build_parser().parse_args(argv)
    if args.list:
        for name in list_specs():
            try:
                spec, _ = load_spec(name)
                print(f"{name:<24} {spec.reproduces:<22} {spec.description}")
            except SpecError as e:
                print(f"{name:<24} INVALID: {e}")
        return 0
    if not args.spec:
        build_parser().print_usage(sys.stderr)
        print("error: give a SPEC (or --list)", file=sys.stderr)
        return 2

    from sftok_experiments.campaign import Options, cache_root, run_campaign, work_root
    from sftok_experiments.expand import expand, parse_data, parse_set
    from sftok_experiments.overview import describe

    # Everything below until run_campaign is validation: no Ray, no training.
    try:
        spec, path = load_spec(args.spec)
        plan = expand(spec, path, preset=args.preset, seeds=args.seeds,
                      sets=parse_set(args.sets), data=parse_data(args.data))
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_concurrent is not None and args.max_concurrent < 1:
        print("error: --max-concurrent must be >= 1", file=sys.stderr)
        return 2
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        print("error: --cpus-per-trial must be > 0 and --gpus-per-trial >= 0", file=sys.stderr)
        return 2
    opts = Options(tracking=args.tracking_uri, ray_address=args.ray_address,
                   cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                   device=args.device,
                   max_concurrent=args.max_concurrent, resume=args.resume,
                   work_dir=args.work_dir, cache_dir=args.cache_dir,
                   max_failures=args.max_failures, prepare_teacher=not args.no_teacher,
                   share_stages=not args.no_share_stages,
                   progress_every=args.progress_every)
    print(describe(plan, verbose=args.verbose, stage_root=work_root(opts) / "stages",
                   teacher_root=cache_root(opts) / "teachers", share=opts.share_stages),
          flush=True)
    if args.dry_run:
        return 0
    if not confirm_size(plan, args.yes):
        return 2

    opts.resume_hint = resume_command(argv, rr.store_location(args.tracking_uri).uri,
                                      work_root(opts), cache_root(opts))
    if args.trial_fn:
        opts.trial_fn = _load_trial_fn(args.trial_fn)
    os.environ.setdefault("SFTOK_PROGRESS", "0")
    import warnings

    # A warning is one console line here, like every other message of the runner.
    warnings.formatwarning = lambda message, category, *a, **k: (
        f"warning: {category.__name__}: {message}\n")
    result = run_campaign(plan, opts)
    return result.exit_code
