"""The steps of `scripts/device_check.py`; each runs in a process of its own (`run_step`).

A step writes what it has measured through `Results` as it goes (the file is rewritten after
every entry), so a step killed at its time box still leaves its partial answers; it watches its
own deadline (`Results.left()`) to stop cleanly before that. A step that finds it cannot run
here says so with `Results.skip(reason)`. Sizes: on CUDA the paper's `sftok-b` and the one-GPU
`small` preset at their own batch sizes and precision (bf16); `--quick` (the CPU rehearsal)
runs every step at `smoke` size.

Only torch, the library and the runner's `placement` names (standard library only) are imported
at the top: the lent GPU machines lack Ray, MLflow and pydantic, and the steps that need them are
skipped by the driver before they start.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "experiments"):  # the checkout: no install needed (python3 on a GPU image)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# The library and the runner's placement tags after the path set-up above.
from sftok_experiments.placement import TAG_PREFIX

from sftok import run_record as rr
from sftok.config import override
from sftok.presets import get_preset
from sftok.train import benchmark as bench
from sftok.train.loop import CompileFallbackWarning, compile_children, resolve_device

# Datasheet dense bf16 matrix peaks (TFLOP/s, no sparsity) by a fragment of the GPU's name:
# NVIDIA H100/H200 SXM 989, H100 PCIe 756, A100 312, L40S 362, RTX 4090 165 (fp32 accumulate).
DATASHEET_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                         ("A100", 312.0), ("L40S", 362.0), ("4090", 165.2))
# What each campaign trial's row shows of its evaluation (the evaluator's names, run_record).
SHOWN_METRICS = (rr.step_metric("psnr", 8), rr.step_metric("psnr", 1))
PACKAGES = ("ray", "mlflow", "pydantic", "optuna", "lpips", "torch_fidelity", "webdataset",
            "timm", "safetensors", "skimage", "yaml", "triton", "pytest")


class Results:
    """A step's results file: `put` / `append` rewrite it atomically; `left()` is the time to
    the step's own deadline (a few seconds before the driver's kill)."""

    def __init__(self, path: Path, deadline: float):
        self.path, self.deadline, self.data = Path(path), deadline, {}

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        self._write()

    def append(self, key: str, value) -> None:
        self.data.setdefault(key, []).append(value)
        self._write()

    def skip(self, reason: str) -> None:
        self.put("_skipped", reason)

    def left(self) -> float:
        return self.deadline - time.time()


def _device(o: dict) -> torch.device:
    return resolve_device(o["device"])


def _sizes(o: dict) -> list[str]:
    """The presets a step measures, most valuable first."""
    return ["smoke"] if o["quick"] else ["sftok-b", "small"]


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _find(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(module: str) -> str | None:
    """The installed version of the distribution that provides `module` (not imported: Ray
    and MLflow take seconds), or None."""
    if not _find(module):
        return None
    for dist in _distributions().get(module) or [module]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "installed"


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


# --------------------------------------------------------------------------------------------
# env
# --------------------------------------------------------------------------------------------


def step_env(r: Results, o: dict) -> None:
    """Versions, the GPU(s), bf16 support, TF32 after set-up, packages and pretrained files
    present, and the measured dense matmul rate (the ceiling MFU is also read against)."""
    from sftok.evaluate.fid import find_inception_weights
    from sftok.train.dino_discriminator import find_dino_weights
    from sftok.train.losses import lpips_backbone_path

    dev = _device(o)
    r.put("python", platform.python_version())
    r.put("host", platform.node())
    r.put("cpus", os.cpu_count())
    r.put("torch", torch.__version__)
    r.put("cuda", torch.version.cuda)
    r.put("cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    r.put("cuda_available", torch.cuda.is_available())
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "memory_gib": p.total_memory / 2 ** 30,
                     "capability": f"{p.major}.{p.minor}",
                     "multiprocessors": p.multi_processor_count})
    r.put("gpus", gpus)
    r.put("bf16_supported", torch.cuda.is_bf16_supported() if dev.type == "cuda" else None)
    r.put("tf32", {"matmul": torch.backends.cuda.matmul.allow_tf32,
                   "cudnn": torch.backends.cudnn.allow_tf32})
    r.put("packages", {m: _version(m) for m in PACKAGES})
    r.put("weights", {"dino": str(find_dino_weights() or "") or None,
                      "vgg16_lpips": str(lpips_backbone_path())
                      if lpips_backbone_path().exists() else None,
                      "inception": str(find_inception_weights()[0] or "") or None})
    r.put("datasheet_bf16_tflops", None)
    r.put("nvidia_smi", None)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        r.put("datasheet_bf16_tflops", next((v for k, v in DATASHEET_BF16_TFLOPS if k in name),
                                            None))
        try:
            query = "--query-gpu=driver_version,clocks.max.sm,power.limit"
            smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], check=False,
                                 capture_output=True, text=True, timeout=10)
            r.put("nvidia_smi", smi.stdout.strip() or smi.stderr.strip())
        except (OSError, subprocess.SubprocessError) as e:
            r.put("nvidia_smi", _one_line(e))
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" and not o["quick"] else (
        (2048, torch.bfloat16) if dev.type == "cuda" else (512, torch.float32))
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))  # random, not zeros
    s = bench.timed(lambda: a @ b, dev, reps=10 if dev.type == "cuda" else 3, warmup=3)
    r.put("matmul", {"n": n, "dtype": str(dtype).removeprefix("torch."), "s": s,
                     "tflops": 2 * n ** 3 / s / 1e12})


# --------------------------------------------------------------------------------------------
# golden
# --------------------------------------------------------------------------------------------


def step_golden(r: Results, o: dict) -> None:
    """tests/test_golden.py on the device, each test in fp32 (TF32 off) and in bf16 autocast,
    with every tensor's measured error (the tolerances are the test file's)."""
    log = Path(o["work"]) / "golden.jsonl"
    log.unlink(missing_ok=True)
    env = dict(os.environ, SFTOK_GOLDEN_DEVICE=o["device"], SFTOK_GOLDEN_PRECISION="fp32,bf16",
               SFTOK_GOLDEN_REPORT=str(log))
    cmd = [sys.executable, "-m", "pytest", "tests/test_golden.py", "-q", "-rA", "-p",
           "no:cacheprovider", "-o", "addopts=", "-W", "ignore::pytest.PytestConfigWarning"]
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=max(5.0, r.left() - 2), check=False)
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"{e.stdout or ''}\ntimed out after {e.timeout:.0f} s", None
    print(text[-6000:], flush=True)
    outcomes = re.findall(r"^(PASSED|FAILED|ERROR) \S+\[([^\]]*)\]", text, re.MULTILINE)
    tensors = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for precision in ("fp32", "bf16"):
        mine = [kind for kind, ids in outcomes if precision in ids.split("-")]
        r.put(precision, {"passed": mine.count("PASSED"),
                          "failed": len(mine) - mine.count("PASSED"),
                          "tensors": [t for t in tensors if t["precision"] == precision]})
    r.put("run", {"returncode": rc, "seconds": time.time() - t0,
                  "summary": text.strip().splitlines()[-1] if text.strip() else ""})


# --------------------------------------------------------------------------------------------
# gpu_path
# --------------------------------------------------------------------------------------------


def _random_teacher(cfg, dev):
    from sftok.teacher import FrozenTeacher, MaskGitVQGAN

    torch.manual_seed(0)
    return FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size).to(dev)


def _batches(cfg, n: int, batch: int, dev: torch.device) -> list:
    size = cfg.tokenizer.image_size
    out = []
    for _ in range(n):
        x = torch.rand(batch, 3, size, size)
        out.append((x.pin_memory() if dev.type == "cuda" else x,
                    torch.zeros(batch, dtype=torch.long)))
    return out


def step_gpu_path(r: Results, o: dict) -> None:
    """What a first GPU run would trip over: host syncs inside a training step (torch's sync
    debug mode on CUDA, the library's own reads everywhere), fused AdamW, pinned batches, TF32,
    the SDPA kernels the model's attention uses, and the compile fallback."""
    from sftok.data.stream import TrainStream
    from sftok.train.stages import build_stage_task
    from sftok.train.syncs import HostReads, cuda_syncs

    dev = _device(o)
    r.put("tf32", {"matmul": torch.backends.cuda.matmul.allow_tf32,
                   "cudnn": torch.backends.cudnn.allow_tf32})
    name = "smoke" if o["quick"] else "small"
    cfg = override(get_preset(name), {"train.stage3.gan_start": 0})  # adversary on at once
    teacher = _random_teacher(cfg, dev)
    for stage in ("stage1", "stage2", "stage3"):
        task = build_stage_task(cfg, stage, teacher, dev)
        s = getattr(cfg.train, stage)
        batches = _batches(cfg, s.grad_accum, min(s.batch_size, 16), dev)
        task.step(batches, 0)  # lazy state (optimiser moments) out of the way
        bench.sync(dev)
        with HostReads() as reads:
            if dev.type == "cuda":
                with cuda_syncs() as syncs:  # (torch.cuda.synchronize itself would count)
                    task.step(batches, 1)
            else:
                syncs = None
                task.step(batches, 1)
        bench.sync(dev)
        r.append("steps", {
            "preset": name, "stage": stage, "micro_batches": s.grad_accum,
            "library_reads": reads.calls,
            "cuda_syncs": None if syncs is None else dict(Counter(syncs)),
            "fused_adamw": bool(task.optimizer.defaults.get("fused")),
            "precision": bench.precision_of(task)})
        del task
    bench.free_memory(dev)

    class _Pool(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(3, 8, 8), i

    pins = {}
    for workers in (0, 2):
        stream = TrainStream(_Pool(), 4, seed=0, num_workers=workers,
                             pin_memory=dev.type == "cuda")
        images, _ = next(stream)
        pins[f"workers={workers}"] = images.is_pinned() if dev.type == "cuda" else None
        stream.load_state_dict(stream.state_dict())  # ends the workers
    r.put("pinned_batches", pins)
    r.put("sdpa", _sdpa_kernels(o, dev))
    r.put("compile_fallback", _compile_fallback())


def _sdpa_kernels(o: dict, dev: torch.device) -> list[dict]:
    """Per preset: the aten attention op the model's own attention dispatches to (bf16 autocast
    on CUDA), and which SDPA backends accept its shape when forced alone."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode

    from sftok.nn.vit import Attention

    class _Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "attention" in func._schema.name:
                self.seen.add(func._schema.name.removeprefix("aten::"))
            return func(*args, **(kwargs or {}))

    out = []
    amp = dev.type == "cuda"
    for name in _sizes(o):
        tok = get_preset(name).tokenizer
        grid = tok.image_size // tok.encoder.patch_size
        length = 1 + grid * grid + tok.num_latent_tokens  # encoder: class, patches, latents
        attn = Attention(tok.encoder.width, tok.encoder.heads).to(dev)
        x = torch.randn(4, length, tok.encoder.width, device=dev, requires_grad=True)
        ops = _Ops()
        with ops, torch.autocast(dev.type, torch.bfloat16, enabled=amp):
            attn(x).sum().backward()
        forced = {}
        for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            if not hasattr(SDPBackend, backend):
                continue
            try:
                with sdpa_kernel(getattr(SDPBackend, backend)), \
                        torch.autocast(dev.type, torch.bfloat16, enabled=amp):
                    attn(x).sum().backward()
                bench.sync(dev)
                forced[backend] = "ok"
            except RuntimeError as e:
                forced[backend] = " ".join(str(e).split())[:160]
        out.append({"preset": name, "head_dim": tok.encoder.width // tok.encoder.heads,
                    "length": length, "dtype": "bf16" if amp else "fp32",
                    "dispatched": sorted(ops.seen), "forced": forced})
    return out


def _compile_fallback() -> dict:
    """A compile failure forced with a broken backend: one warning line, eager numbers."""
    def broken(gm, example_inputs):
        raise RuntimeError("forced compile failure (device check)")

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.GELU()))
    x = torch.randn(2, 8)
    want = model(x)
    compile_children(model, backend=broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = model(x)
        model(x)
    lines = [str(w.message) for w in caught if issubclass(w.category, CompileFallbackWarning)]
    return {"warnings": len(lines), "same_numbers": bool(torch.equal(got, want)),
            "message": lines[0] if lines else None}


# --------------------------------------------------------------------------------------------
# throughput, compile
# --------------------------------------------------------------------------------------------


def _rows(r: Results, o: dict, key: str, compile_backend: str | None, order) -> None:
    dev = _device(o)
    steps, warmup = (1, 1) if o["quick"] else (3, 2)
    # rough seconds a row takes, to stop before the deadline rather than be killed in a row
    need = 5.0 if o["quick"] else (60.0 if compile_backend else 20.0)
    for name, stage in order:
        if r.left() < need:
            r.append("not_measured", {"preset": name, "stage": stage, "why": "time box"})
            continue
        try:
            bench.benchmark_training(get_preset(name), stages=(stage,), steps=steps,
                                     warmup=warmup, device=str(dev), flops=compile_backend is None,
                                     compile_backend=compile_backend,
                                     on_row=lambda row: r.append(key, row))
        except Exception as e:  # noqa: BLE001 (one row's failure is a result; the rest run)
            print(traceback.format_exc(), flush=True)
            r.append("errors", {"preset": name, "stage": stage, "error": _one_line(e)})
            bench.free_memory(dev)


def step_throughput(r: Results, o: dict) -> None:
    """Training throughput (images/s), peak memory and model FLOPs per step, eager, at each
    preset's batch and precision; stage 3 with the GAN on (DINO discriminator when its weights
    are found, else PatchGAN: the row says which)."""
    order = [(n, s) for n in _sizes(o) for s in ("stage1", "stage2", "stage3")]
    _rows(r, o, "rows", None, order)


def step_compile(r: Results, o: dict) -> None:
    """The same rows with the tokenizer under torch.compile (inductor; the CPU rehearsal uses
    dynamo's `eager` backend: inductor's C++ build takes minutes on 2 cores). Stage 2 first (it
    dominates the paper's budget), of `small` first: its compilation is the quickest, so even a
    short box answers whether compiling works here; then `sftok-b` (recompiling ViT-B takes
    about a minute per stage on a fresh cache, the reason this step comes last)."""
    order = [(n, s) for n in _sizes(o) for s in ("stage2", "stage1", "stage3")]
    if not o["quick"]:
        order = [("small", "stage2")] + [x for x in order if x != ("small", "stage2")]
    _rows(r, o, "rows", "eager" if o["quick"] else "inductor", order)


# --------------------------------------------------------------------------------------------
# decode, max_batch
# --------------------------------------------------------------------------------------------


def step_decode(r: Results, o: dict) -> None:
    """S = 8 decoding of `sftok-b` (random weights, bf16): images/s and its cost against one
    decoder pass (8 passes is the floor; the rest is sampling and re-masking)."""
    dev = _device(o)
    name = _sizes(o)[0]
    cfg = get_preset(name)
    for batch in ((8,) if o["quick"] else (64, 256)):
        if r.left() < 10:
            break
        t = bench.time_inference(cfg, dev, batch, steps=8, reps=3 if o["quick"] else 5,
                                 warmup=1, amp=dev.type == "cuda")
        r.append("runs", {"preset": name, **t, "amp_bf16": dev.type == "cuda",
                          "decode_images_per_s": batch / t["decode_s"],
                          "encode_decode_images_per_s": batch / (t["encode_s"] + t["decode_s"]),
                          "decode_over_one_pass": t["decode_s"] / t["pass_s"]})
        bench.free_memory(dev)


def step_max_batch(r: Results, o: dict) -> None:
    """The largest `sftok-b` stage-2 micro-batch whose training step fits in GPU memory."""
    dev = _device(o)
    name = _sizes(o)[0]
    start, limit = (8, 32) if o["quick"] else (32, 16384)
    res = bench.largest_batch(get_preset(name), "stage2", str(dev), start=start, limit=limit,
                              time_box=max(1.0, r.left() - 15),
                              on_probe=lambda p: r.append("probes", p))
    for k, v in res.items():
        if k != "probes":
            r.put(k, v)


# --------------------------------------------------------------------------------------------
# campaign, ray_train (need Ray + MLflow + pydantic)
# --------------------------------------------------------------------------------------------


def _run_cli(r: Results, args: list[str], work: Path, reserve: float = 20.0) -> dict:
    """experiments/run.py ARGS into a fresh store / work / cache under `work`; its output goes
    to the step's log. Returns {returncode, seconds, summary}."""
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), *args,
           "--tracking-uri", str(work / "mlruns"), "--work-dir", str(work / "runs"),
           "--cache-dir", str(work / "cache"), "--progress-every", "15"]
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.time()
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             timeout=max(10.0, r.left() - reserve), check=False)
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    print(text[-8000:], flush=True)
    summary = [ln for ln in text.splitlines() if ln.startswith(("summary:", "stage results:"))]
    return {"command": " ".join(cmd[1:]), "returncode": rc, "seconds": time.time() - t0,
            "summary": summary}


def _trial_runs(work: Path, spec: str) -> list[dict]:
    """The trials of the newest campaign in the store under `work`, read through the run
    record's names (`sftok/run_record.py`; the `placement.*` tags: `placement.py`): trial key,
    status, placement tags (prefix dropped), error, and PSNR at S = 8 and 1 (`SHOWN_METRICS`).

    Parent and children are told apart by the record's own rules (`rr.is_parent`,
    `rr.parent_of`), not by a search filter, so a store whose parent runs lack the role tag
    (written before issue 18) reads the same: the newest parent run that has children."""
    from sftok_experiments.tracking import client_for  # (MLflow: not on a bare GPU image)

    client = client_for(rr.store_location(work / "mlruns").uri)
    exp = client.get_experiment_by_name(rr.experiment_name(spec))
    if exp is None:
        return []
    runs = rr.search_all(client, [exp.experiment_id], order_by=rr.NEWEST_FIRST)
    children: dict[str, list] = {}
    for run in reversed(runs):  # oldest first within each parent
        parent = rr.parent_of(run.data.tags)
        if parent is not None:
            children.setdefault(parent, []).append(run)
    newest = next((run for run in runs if rr.is_parent(run.data.tags)
                   and run.info.run_id in children), None)
    if newest is None:
        return []
    shown = {rr.eval_key(name): name for name in SHOWN_METRICS}
    return [{"trial": run.data.tags.get(rr.KEY_TAG, run.info.run_name),
             "status": run.info.status,
             "placement": {k.removeprefix(TAG_PREFIX): v for k, v in run.data.tags.items()
                           if k.startswith(TAG_PREFIX)},
             "error": run.data.tags.get(rr.ERROR_TAG),
             "metrics": {name: run.data.metrics[key] for key, name in shown.items()
                         if key in run.data.metrics}}
            for run in children[newest.info.run_id]]


def step_campaign(r: Results, o: dict) -> None:
    """The `smoke` Table 4 campaign through Ray: on CUDA with fractional GPU shares (0.25, so
    its 3 trials share the GPU at once) and `--device auto`; the placement tags each trial
    reported, read back from MLflow."""
    work = Path(o["work"]) / "campaign"
    shares = ["--device", "cpu"] if o["device"] == "cpu" else [
        "--gpus-per-trial", "0.25", "--device", "auto"]
    r.put("run", _run_cli(r, ["ablation_replace_ratio", "--preset", "smoke", "--seeds", "1",
                              "--cpus-per-trial", "1", *shares], work))
    r.put("trials", _trial_runs(work, "ablation_replace_ratio"))


def step_ray_train(r: Results, o: dict) -> None:
    """One data-parallel Ray Train trial (issue 19): 1 worker on NCCL (gloo on CPU), and 2
    workers when two GPUs are visible; skipped where the runner has no --workers-per-trial."""
    import yaml
    from sftok_experiments.cli import build_parser
    from sftok_experiments.spec import load_spec

    if "--workers-per-trial" not in build_parser()._option_string_actions:
        r.skip("data-parallel trials not available in this checkout (no --workers-per-trial)")
        return
    _, path = load_spec("ablation_replace_ratio")  # one arm of Table 4: one trial
    spec = yaml.safe_load(Path(path).read_text())
    spec["arms"] = {"grid": {"train.stage2.replace_ratio": [1.0]}}
    work = Path(o["work"]) / "ray_train"
    work.mkdir(parents=True, exist_ok=True)
    one = work / "ray_train_spec.yaml"
    one.write_text(yaml.safe_dump(spec))
    plans = [(1, ["--device", "cpu"] if o["device"] == "cpu" else
              ["--gpus-per-trial", "0.5", "--device", "auto"])]
    if o["device"] != "cpu" and torch.cuda.device_count() >= 2:
        plans.append((2, ["--gpus-per-trial", "1", "--device", "auto"]))
    for workers, extra in plans:
        sub = work / f"w{workers}"
        res = _run_cli(r, [str(one), "--preset", "smoke", "--seeds", "1",
                           "--workers-per-trial", str(workers), *extra], sub,
                       reserve=10.0)
        r.append("runs", {"workers": workers, **res,
                          "trials": _trial_runs(sub, spec["name"])})


STEPS = {"env": step_env, "golden": step_golden, "gpu_path": step_gpu_path,
         "throughput": step_throughput, "decode": step_decode, "max_batch": step_max_batch,
         "campaign": step_campaign, "ray_train": step_ray_train, "compile": step_compile}


def _end_with_the_driver(driver: int | None) -> None:
    """A step runs in its own session (so the driver can end its whole tree: pytest, Ray);
    if the driver (pid `driver`, from the state file: it may be gone before this runs) is
    killed outright (SIGKILL, a device tool's time limit), the step and everything it started
    end too, within a second, instead of holding the GPU."""
    driver = driver or os.getppid()

    def watch() -> None:
        while True:
            if os.getppid() != driver:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True, name="driver-watch").start()


def run_step(name: str, state_path: Path) -> int:
    """Run one step as the driver asked (its state file: options, deadline, where to write)."""
    state = json.loads(Path(state_path).read_text())
    _end_with_the_driver(state.get("driver"))
    results = Results(Path(state["results"]), state["deadline"])
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, state.get("threads") or 64)))
    try:
        STEPS[name](results, state)
    except Exception as e:  # noqa: BLE001 (the step's one-line error, for the report)
        traceback.print_exc()
        results.put("_error", _one_line(e))
        return 1
    return 0
