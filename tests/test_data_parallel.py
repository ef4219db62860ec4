"""Data-parallel training and sharded evaluation (issue 19) on CPU with gloo.

- W = 1 keeps the single-process path bit for bit: the smoke teacher, stages 1-3 and the
  generator trained by this code equal the weights the code before data parallelism produced
  (tests/fixtures/w1_golden.safetensors; bitwise on the platform that wrote it, close elsewhere).
- W = 2 × accumulation 1 equals W = 1 × accumulation 2 up to float reduction order, for stage 1,
  stage 2 (SFVR) and stage 3 with the GAN term and LeCam (final weights and the loss curve); a
  NaN on one rank stops both ranks with one line naming it; a W = 2 run interrupted after a
  checkpoint resumes to the uninterrupted run's weights; W must divide grad_accum.
- Evaluation sharded over 2 ranks equals the single-process evaluation: PSNR / SSIM, token and
  trace metrics, the floors and ceiling, rFID (reference statistics computed sharded, or read
  from a cache the single process wrote: the image hash matches) and IS, at decode temperature 1.
The two workers are `torch.multiprocessing` processes on a gloo file store; one module fixture
runs them all in one process group (a few seconds on 2 cores).
"""
from __future__ import annotations

import importlib.util
import json
import pickle
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file

from sftok.config import ConfigError, override
from sftok.distributed import Workers, accum_per_worker, init_workers
from sftok.presets import get_preset
from sftok.train import NonFiniteLossError, get_teacher, train_stage
from sftok.train import stages as stages_mod

FIXTURES = Path(__file__).parent / "fixtures"
W = 2
# W = 1 accumulates 2 micro-batches of 4 per step, each of the 2 workers 1: the same step.
SETS = {"train.stage1.grad_accum": 2, "train.stage2.grad_accum": 2,
        "train.stage3.grad_accum": 2, "train.stage3.steps": 3}
# Float reduction order only (gloo's all-reduce of the two micro-batches' gradients vs
# autograd's accumulation of them). Measured on smoke (2 cores, torch 2.14 CPU): first-step
# gradients ||g2 - g1|| / ||g1|| over all of a module's parameters <= ~4e-7 (per tensor too,
# except where a gradient is cancellation noise: the PatchGAN's last bias gets 0.5·(1 - 1)
# from the hinge terms plus a 1e-6 LeCam part, 1e-8 apart); after 3 Adam steps the final weights
# <= 6e-5 per tensor (relative L2) and the loss curve ~6e-8. Adam's first steps move every
# weight by about ±lr whatever the size of its gradient, so weights whose gradient is zero in
# exact arithmetic (the attention key bias: softmax ignores it) follow float noise in both runs:
# elementwise they differ by up to 1e-4 (stage 1-2) / 7e-4 (stage 3) of the tensor's largest
# entry. Bounds: 10-20x the measured figures.
GRAD_TOLERANCE = 1e-5
WEIGHT_TOLERANCE = 1e-3
CURVE_TOLERANCE = 1e-5


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_w1_golden",
                                                  FIXTURES / "make_w1_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                 norm: bool = False) -> float:
    """Largest over tensors of max|a - b| / max|a| (norm: ||a - b|| / ||a||, L2); tensors that
    are not floating point must be equal."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k, x in a.items():
        y = b[k]
        if not x.is_floating_point():
            assert torch.equal(x, y), k
            continue
        if norm:
            worst = max(worst, float((x - y).norm() / x.norm().clamp_min(1e-20)))
        else:
            worst = max(worst, float((x - y).abs().max() / x.abs().max().clamp_min(1e-20)))
    return worst


def grad_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all of a module's gradients, the worse of model and discriminator."""
    assert a.keys() == b.keys()
    worst = 0.0
    for group in {k.split("/")[0] for k in a}:
        names = [k for k in a if k.startswith(group + "/")]
        x = torch.cat([a[k].flatten() for k in names])
        y = torch.cat([b[k].flatten() for k in names])
        worst = max(worst, float((x - y).norm() / x.norm()))
    return worst


def curve_rel_diff(h1: list[dict], h2: list[dict], key: str = "loss") -> float:
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    return max(abs(a[key] - b[key]) / max(abs(a[key]), 1e-12) for a, b in zip(h1, h2))


# ---- W = 1: the single-process path, bit for bit -------------------------------------------


def test_one_worker_keeps_the_single_process_results(tmp_path):
    golden = _golden_module()
    with safe_open(str(FIXTURES / "w1_golden.safetensors"), "pt") as f:
        meta = f.metadata()
    expected = load_file(str(FIXTURES / "w1_golden.safetensors"))
    got = golden.train_all(tmp_path)
    assert got.keys() == expected.keys()
    same_platform = all(meta[k] == v for k, v in golden.platform().items())
    for k, v in expected.items():
        if same_platform:  # written by the code before data parallelism, on this platform
            assert torch.equal(got[k], v), k
        else:  # other CPU kernels: only float-level differences are allowed
            torch.testing.assert_close(got[k], v, rtol=1e-3, atol=1e-5, msg=k)


# ---- pure parts -------------------------------------------------------------------------------


def test_accumulation_per_worker_keeps_the_effective_batch():
    # sftok-b: 32 x 8 = 256, the paper's 8 GPUs x 32 (Section 4.1)
    assert [accum_per_worker(8, 32, w, "train.stage1.grad_accum") for w in (1, 2, 4, 8)] == \
        [8, 4, 2, 1]
    with pytest.raises(ConfigError) as err:
        accum_per_worker(8, 32, 3, "train.stage1.grad_accum")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("train.stage1.grad_accum:")
    assert "256" in msg and "3 workers" in msg and "multiple of 3" in msg


def test_a_pipeline_checks_every_stage_it_trains():
    from sftok.train import check_world_size

    cfg = override(get_preset("smoke"), {"train.teacher.grad_accum": 2,
                                         "train.stage1.grad_accum": 2,
                                         "train.stage2.grad_accum": 4})
    check_world_size(cfg, ["stage0", "stage1", "stage2"], 2)
    with pytest.raises(ConfigError, match=r"^train\.stage2\.grad_accum: .* 3 workers"):
        check_world_size(override(cfg, {"train.stage1.grad_accum": 3}),
                         ["stage1", "stage2"], 3)  # stage 1 divides, stage 2 (4) does not
    with pytest.raises(ConfigError, match=r"^generation\.train\.grad_accum"):
        check_world_size(override(cfg, {"generation.train.grad_accum": 1}),
                         ["stage1", "generation"], 2)


def test_a_world_size_that_does_not_divide_the_accumulation_is_refused_before_compute(
        tmp_path, monkeypatch):
    monkeypatch.setattr(stages_mod, "build_stage_task",
                        lambda *a, **k: pytest.fail("no task may be built"))
    cfg = override(get_preset("smoke"), {"train.stage1.grad_accum": 1})

    class Two(Workers):  # rank 0 of 2 without a process group: only the arithmetic runs
        def __post_init__(self):
            pass

    with pytest.raises(ConfigError, match="train.stage1.grad_accum.*2 workers"):
        train_stage(cfg, "stage1", None, tmp_path, workers=Two(0, 2))


def test_micro_batches_of_a_step_are_dealt_by_rank():
    class Four(Workers):
        def __post_init__(self):
            pass

    assert [Four(r, 4).micro_indices(2) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert Workers().micro_indices(3) == [0, 1, 2]
    one = Workers()  # every collective of one process is the identity
    t = torch.arange(3.0)
    assert one.all_reduce_sum(t) is t and one.all_gather(t)[0] is t
    assert one.on_main("x", lambda: 5) == 5 and one.main_first("x", lambda: 6) == 6


# ---- W = 2 on gloo ---------------------------------------------------------------------------


def _cfg():
    return override(get_preset("smoke"), SETS)


def _worker(rank: int, world: int, store: str, work: str, jobs: list[str]) -> None:
    """One of W processes: join the group, run `jobs`, write what the parent checks."""
    torch.set_num_threads(1)
    work = Path(work)
    workers = init_workers(rank, world, f"file://{store}", backend="gloo", timeout_s=60)
    cfg = _cfg()
    teacher = get_teacher(cfg, work / "cache", train_if_missing=False)
    out: dict = {}
    for job in jobs:
        try:
            out[job] = JOBS[job](cfg, teacher, work, workers)
        except Exception as e:  # noqa: BLE001 (recorded for the parent's assertions)
            out[job] = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__,
                        "traceback": traceback.format_exc()}
    (work / f"rank{rank}.json").write_text(json.dumps(out, default=str))


def first_step_grads(cfg, stage: str, teacher, init, workers) -> dict[str, torch.Tensor]:
    """Gradients (after the all-reduce and clipping) of one optimiser step of `stage`, the
    model's and the discriminator's; stage 3 at step 1, where the GAN term is on."""
    from sftok.data import TrainStream, build_train_dataset

    scfg = stages_mod.stage_config(cfg, stage)
    s = getattr(scfg.train, stage)
    task = stages_mod.build_stage_task(scfg, stage, teacher, torch.device("cpu"), init=init,
                                       workers=workers)
    stream = TrainStream(build_train_dataset(cfg.data), s.batch_size,
                         seed=stages_mod.stage_seed(cfg, stage), rank=workers.rank,
                         world_size=workers.world_size)
    it = iter(stream)
    step = s.gan_start if stage == "stage3" else 0
    task.step([next(it) for _ in range(s.grad_accum // workers.world_size)], step)
    out = {f"model/{n}": p.grad.clone() for n, p in task.model.named_parameters()
           if p.grad is not None}
    if task.adversary is not None:
        out.update({f"disc/{n}": p.grad.clone()
                    for n, p in task.adversary.disc.named_parameters() if p.grad is not None})
    return out


def _inits(work: Path, w: str) -> dict[str, Path | None]:
    return {"stage1": None, "stage2": work / w / "stage1" / "final",
            "stage3": work / w / "stage2" / "final"}


def _job_grads(cfg, teacher, work, workers):
    from safetensors.torch import save_file

    for stage, init in _inits(work, "w1").items():
        grads = first_step_grads(cfg, stage, teacher, init, workers)
        if workers.is_main:
            save_file(grads, str(work / f"grads_w2_{stage}.safetensors"))
    return {}


def _job_pixel_path(cfg, teacher, work, workers):
    """Stage 1 with the pixel path built (finetune_decoder from the start): its parameters get
    no gradient in stages 1-2; DDP trains without find_unused_parameters."""
    pcfg = override(cfg, {"tokenizer.finetune_decoder": True, "train.stage1.steps": 2})
    res = train_stage(pcfg, "stage1", teacher, work / "pixel_path", workers=workers)
    return {"steps": res.steps}


def _job_syncs(cfg, teacher, work, workers):
    """Tensor reads made by the library in one stage-2 step at W = 2 (DDP's collectives are
    no host syncs; issue 10: none per step)."""
    import sys

    import sftok

    lib = str(Path(sftok.__file__).resolve().parent)
    calls: list[str] = []
    reals = {}
    for name in ("__float__", "__int__", "__bool__", "__index__", "item", "tolist"):
        real = reals[name] = getattr(torch.Tensor, name)

        def wrapper(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(lib):
                calls.append(f"{_name} in {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return _real(self, *a, **k)

        setattr(torch.Tensor, name, wrapper)
    try:
        task = stages_mod.build_stage_task(cfg, "stage2", teacher, torch.device("cpu"),
                                           workers=workers)
        batch = (torch.rand(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
        calls.clear()
        task.step([batch], 0)
    finally:
        for name, real in reals.items():
            setattr(torch.Tensor, name, real)
    return {"reads": calls}


def _job_stages(cfg, teacher, work, workers):
    init, out = None, {}
    for stage in ("stage1", "stage2", "stage3"):
        res = train_stage(cfg, stage, teacher, work / "w2" / stage, init=init, workers=workers)
        out[stage] = {"checkpoint": str(res.checkpoint), "history": res.history}
        init = res.checkpoint if stage != "stage3" else init
    return out


def _job_nan(cfg, teacher, work, workers):
    """Rank 1's loss becomes NaN at its 2nd micro-batch (step 2): every rank must stop."""
    real = stages_mod.weighted_ce
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if workers.rank == 1 and calls["n"] == 2:
            out.loss = out.loss * float("nan")
        return out

    stages_mod.weighted_ce = poisoned
    try:
        nan_cfg = override(cfg, {"train.stage1.steps": 4, "train.stage1.ckpt_every": 1})
        train_stage(nan_cfg, "stage1", teacher, work / "nan", workers=workers)
    except NonFiniteLossError as e:
        return {"message": str(e), "rank": e.rank, "step": e.step}
    finally:
        stages_mod.weighted_ce = real
    return {"message": None}


class _Crash(Exception):
    pass


def _job_resume(cfg, teacher, work, workers):
    """Stage 2 at W = 2, interrupted after its step-2 checkpoint, then resumed."""
    rcfg = override(cfg, {"train.stage2.steps": 4, "train.stage2.ckpt_every": 2})
    init = work / "w2" / "stage1" / "final"
    full = train_stage(rcfg, "stage2", teacher, work / "full", init=init, workers=workers)

    def crash(step, metrics):
        if step == 3:  # after the step-2 checkpoint: step 3 is lost and redone
            raise _Crash

    try:
        train_stage(rcfg, "stage2", teacher, work / "resumed", init=init, callback=crash,
                    workers=workers)
    except _Crash:
        pass
    resumed = train_stage(rcfg, "stage2", teacher, work / "resumed", init=init, workers=workers)
    return {"full": str(full.checkpoint), "resumed": str(resumed.checkpoint),
            "full_history": full.history, "resumed_history": resumed.history}


def eval_config():
    from sftok.config import EvalConfig

    # smoke's 6 held-out images in 3 batches of 2: rank 0 gets batches 0 and 2, rank 1 batch 1
    return EvalConfig(decode_steps=(1, 4), trace_steps=4, batch_size=2, max_images=None,
                      temperature=1.0, metrics=("psnr", "ssim", "tokens", "rfid", "is"),
                      grid_images=3)


def run_eval(cfg, teacher, work: Path, workers, cache: Path):
    """evaluate() of the W = 1 stage-2 tokenizer, as the parent and as each worker runs it."""
    from test_eval_helpers import register_tiny_extractor

    from sftok.data import build_val_dataset, val_batches
    from sftok.evaluate import evaluate
    from sftok.evaluate.bounds import build_bounds
    from sftok.train.stage_setup import build_tokenizer, load_init

    ev = eval_config()
    tok = build_tokenizer(cfg, teacher)
    load_init(tok, work / "w1" / "stage2" / "final")
    images = val_batches(build_val_dataset(cfg.data), ev.batch_size, ev.max_images,
                         rank=workers.rank, world_size=workers.world_size)
    bounds = build_bounds(cfg, work / "cache", workers)
    return evaluate(tok, teacher, images, ev, progress=False, decode_cfg=cfg.decode,
                    cache_dir=cache, dataset_key="smoke-val",
                    fid_feature_extractor=register_tiny_extractor(), bounds=bounds,
                    workers=workers)


def _job_eval(cfg, teacher, work, workers):
    import numpy as np

    out = {}
    for name, cache in (("cached", work / "eval_cache_w1"), ("fresh", work / "eval_cache_w2")):
        r = run_eval(cfg, teacher, work, workers, cache)
        out[name] = {"metrics": r.metrics, "unavailable": r.unavailable, "trace": r.trace,
                     "grids": {str(s): g.tolist() for s, g in r.grids.items()}}
    # the reference statistics this sharded run computed and stored
    (z,) = (work / "eval_cache_w2" / "fid_stats").glob("*.npz")
    with np.load(z) as f:
        out["fresh_stats"] = {"mu": f["mu"].tolist(), "n": int(f["num_images"])}
    return out


JOBS = {"grads": _job_grads, "stages": _job_stages, "nan": _job_nan, "resume": _job_resume,
        "eval": _job_eval, "pixel_path": _job_pixel_path, "syncs": _job_syncs}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """Teacher and W = 1 references in this process, then one 2-process gloo group runs
    every job; returns (work dir, {job: rank-0 output}, {job: rank-1 output})."""
    work = tmp_path_factory.mktemp("dist")
    cfg = _cfg()
    teacher = get_teacher(cfg, work / "cache")
    init = None
    for stage in ("stage1", "stage2", "stage3"):
        res = train_stage(cfg, stage, teacher, work / "w1" / stage, init=init)
        init = res.checkpoint if stage != "stage3" else init
    single_eval = run_eval(cfg, teacher, work, Workers(), work / "eval_cache_w1")
    (work / "eval_w1.pt").write_bytes(pickle.dumps(single_eval))
    mp.spawn(_worker, args=(W, str(work / "store"), str(work), list(JOBS)), nprocs=W,
             join=True)
    outs = [json.loads((work / f"rank{r}.json").read_text()) for r in range(W)]
    for result in outs[0].values():
        assert "error" not in result, result.get("traceback")
    return work, outs[0], outs[1]


@pytest.mark.parametrize("stage", ["stage1", "stage2", "stage3"])
def test_two_workers_equal_one_worker_accumulating_twice(two_workers, stage):
    """The same micro-batches, masks and coins, gradients averaged by DDP (the generator) and
    by one all-reduce (the discriminator): the first step's gradients and the trained stage
    equal W = 1 accumulating both micro-batches, up to float reduction order."""
    work, out, _ = two_workers
    cfg = _cfg()
    teacher = get_teacher(cfg, work / "cache", train_if_missing=False)
    g1 = first_step_grads(cfg, stage, teacher, _inits(work, "w1")[stage], Workers())
    g2 = load_file(str(work / f"grads_w2_{stage}.safetensors"))
    grads = grad_rel_diff(g1, g2)
    one = train_stage(cfg, stage, None, work / "w1" / stage)  # finished: read back
    two = out["stages"][stage]
    w1, w2 = _weights(one.checkpoint), _weights(two["checkpoint"])
    weights, elementwise = max_rel_diff(w1, w2, norm=True), max_rel_diff(w1, w2)
    curve = curve_rel_diff(one.history, two["history"])
    print(f"\n{stage}: W=2 vs W=1 largest relative difference: first-step gradients "
          f"{grads:.1e}, final weights {weights:.1e} (L2 per tensor; {elementwise:.1e} "
          f"elementwise), loss curve {curve:.1e}")
    assert grads < GRAD_TOLERANCE
    assert weights < WEIGHT_TOLERANCE and curve < CURVE_TOLERANCE
    if stage == "stage3":  # the GAN term and LeCam were on (gan_start 1) and logged
        assert any(k.startswith("disc/") for k in g1) and g1.keys() == g2.keys()
        assert {"gan_g", "gan_d", "lecam"} <= set(two["history"][-1])


def test_unused_pixel_path_needs_no_find_unused_parameters(two_workers):
    _, out0, out1 = two_workers
    assert out0["pixel_path"] == out1["pixel_path"] == {"steps": 2}


def test_a_two_worker_step_reads_nothing_back(two_workers):
    _, out0, out1 = two_workers
    assert out0["syncs"]["reads"] == [] and out1["syncs"]["reads"] == []


def test_nan_on_one_rank_stops_every_rank_with_one_line_naming_it(two_workers):
    _, out0, out1 = two_workers
    for out in (out0, out1):
        nan = out["nan"]
        msg = nan["message"]
        assert msg is not None and "\n" not in msg
        assert (nan["rank"], nan["step"]) == (1, 2)
        assert "non-finite loss" in msg and "on rank 1 of 2" in msg and "step 2" in msg
        assert "step_00000001" in msg  # the last good checkpoint, written before the NaN
    assert out0["nan"]["message"] == out1["nan"]["message"]
    print("NaN on rank 1:", out0["nan"]["message"])


def test_two_workers_resume_to_the_uninterrupted_weights(two_workers):
    work, out, _ = two_workers
    res = out["resume"]
    assert max_rel_diff(_weights(res["full"]), _weights(res["resumed"])) == 0.0
    def curve(history):  # everything but the timing
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]

    assert curve(res["full_history"]) == curve(res["resumed_history"])
    # the checkpoint carries every rank's own RNG states
    state = torch.load(work / "resumed" / "step_00000004" / "state.pt", weights_only=True)
    assert len(state["rng_ranks"]) == W


# ---- sharded evaluation ----------------------------------------------------------------------


def test_sharded_evaluation_equals_the_single_process_one(two_workers):
    import numpy as np

    work, out0, out1 = two_workers
    single = pickle.loads((work / "eval_w1.pt").read_bytes())
    assert single.unavailable == {} and "rfid_s4" in single.metrics
    assert {"floor_tokenizer_psnr", "teacher_psnr", "token_top1", "is_s1"} <= set(single.metrics)
    for name in ("cached", "fresh"):
        for out in (out0, out1):  # every rank gets rank 0's result
            got = out["eval"][name]
            assert got["unavailable"] == {}, name  # the cached stats' image hash matched
            assert got["metrics"].keys() == single.metrics.keys()
            for k, v in single.metrics.items():
                assert got["metrics"][k] == pytest.approx(v, rel=1e-9, abs=1e-9), (name, k)
            for row, want in zip(got["trace"], single.trace):
                assert row == pytest.approx(want, rel=1e-9, abs=1e-12)
            assert {int(s): np.array(g, dtype=np.uint8) for s, g in got["grids"].items()}.keys() \
                == single.grids.keys()
            for s, g in single.grids.items():
                np.testing.assert_array_equal(np.array(got["grids"][str(s)], dtype=np.uint8), g)
    (z,) = (work / "eval_cache_w1" / "fid_stats").glob("*.npz")
    with np.load(z) as f:
        mu, n = f["mu"], int(f["num_images"])
    fresh = out0["eval"]["fresh_stats"]
    assert fresh["n"] == n == 6
    np.testing.assert_allclose(np.array(fresh["mu"]), mu, rtol=1e-12, atol=1e-12)


# ---- slow: the teacher (stage 0), the generator, torchrun --------------------------------------

SLOW_SETS = {"train.teacher.grad_accum": 2, "train.teacher.steps": 25,  # a dead-code reset at 20
             "generation.train.grad_accum": 2, "train.stage1.grad_accum": 2}


def _slow_cfg():
    return override(get_preset("smoke"), SLOW_SETS)


def _slow_worker(rank: int, world: int, store: str, work: str) -> None:
    from sftok.data import build_train_dataset
    from sftok.generation.pretokenize import cached_tokens, load_tokens
    from sftok.generation.train import train_generator
    from sftok.train import train_teacher

    torch.set_num_threads(1)
    work = Path(work)
    workers = init_workers(rank, world, f"file://{store}", backend="gloo", timeout_s=60)
    cfg = _slow_cfg()
    record = train_teacher(cfg, work / "w2_teacher", workers=workers)
    teacher = get_teacher(cfg, work / "cache", train_if_missing=False)
    tok = stages_mod.build_tokenizer(cfg, teacher)
    stages_mod.load_init(tok, work / "stage1" / "final")
    # rank 0 tokenises once and stores; rank 1 reads rank 0's file
    tokens, was_cached = cached_tokens(tok, work / "stage1" / "final",
                                       build_train_dataset(cfg.data), "smoke", work / "tokcache",
                                       batch_size=8, workers=workers)
    same = torch.equal(tokens.tokens, load_tokens(work / "tokens.safetensors").tokens)
    gen = train_generator(cfg, tokens, work / "w2_generation", workers=workers)
    (work / f"w2_tokens_rank{rank}.json").write_text(json.dumps(
        {"was_cached": was_cached, "same": same}))
    if workers.is_main:
        (work / "w2.json").write_text(json.dumps(
            {"teacher_history": record["history"], "generation": str(gen.checkpoint),
             "generation_history": gen.history}))


@pytest.fixture(scope="module")
def slow_two_workers(tmp_path_factory):
    from sftok.data import build_train_dataset
    from sftok.generation.pretokenize import pretokenize, save_tokens
    from sftok.generation.train import train_generator
    from sftok.train import train_teacher

    work = tmp_path_factory.mktemp("dist_slow")
    cfg = _slow_cfg()
    w1_teacher = train_teacher(cfg, work / "w1_teacher")
    teacher = get_teacher(cfg, work / "cache")
    stage1 = train_stage(cfg, "stage1", teacher, work / "stage1")
    tok = stages_mod.build_tokenizer(cfg, teacher)
    stages_mod.load_init(tok, stage1.checkpoint)
    tokens = pretokenize(tok, build_train_dataset(cfg.data), batch_size=8)
    save_tokens(work / "tokens.safetensors", tokens)
    w1_gen = train_generator(cfg, tokens, work / "w1_generation")
    mp.spawn(_slow_worker, args=(W, str(work / "store"), str(work)), nprocs=W, join=True)
    return work, w1_teacher, w1_gen, json.loads((work / "w2.json").read_text())


@pytest.mark.slow
def test_two_worker_teacher_equals_one_worker(slow_two_workers):
    work, w1, _, w2 = slow_two_workers
    assert any("codes_reset" in row for row in w1["history"])  # the gathered reset ran
    weights = max_rel_diff(_weights(work / "w1_teacher"), _weights(work / "w2_teacher"),
                           norm=True)
    curve = curve_rel_diff(w1["history"], w2["teacher_history"])
    codes = [(a.get("codes_reset"), b.get("codes_reset"))
             for a, b in zip(w1["history"], w2["teacher_history"])]
    print(f"\nstage0: W=2 vs W=1 largest relative difference: final weights {weights:.1e}, "
          f"loss curve {curve:.1e}; codes reset {codes}")
    assert all(a == b for a, b in codes)
    assert weights < WEIGHT_TOLERANCE and curve < CURVE_TOLERANCE


@pytest.mark.slow
def test_two_worker_generator_equals_one_worker(slow_two_workers):
    work, _, w1, w2 = slow_two_workers  # smoke's generator has no dropout: the same draws
    tok = [json.loads((work / f"w2_tokens_rank{r}.json").read_text()) for r in range(W)]
    assert tok == [{"was_cached": False, "same": True}] * W  # tokenised once, by rank 0
    assert len(list((work / "tokcache" / "tokens").glob("*.safetensors"))) == 1
    weights = max_rel_diff(_weights(w1.checkpoint), _weights(w2["generation"]), norm=True)
    curve = curve_rel_diff(w1.history, w2["generation_history"])
    print(f"\ngeneration: W=2 vs W=1 largest relative difference: final weights {weights:.1e},"
          f" loss curve {curve:.1e}")
    assert weights < WEIGHT_TOLERANCE and curve < CURVE_TOLERANCE


TORCHRUN_SCRIPT = """
import sys
from pathlib import Path
import torch
from sftok.config import override
from sftok.distributed import init_from_env
from sftok.presets import get_preset
from sftok.train import get_teacher, train_stage

torch.set_num_threads(1)
work = Path(sys.argv[1])
workers = init_from_env()
cfg = override(get_preset("smoke"), {"train.stage1.grad_accum": 2})
teacher = get_teacher(cfg, work / "cache", train_if_missing=False)
train_stage(cfg, "stage1", teacher, work / "torchrun_stage1", workers=workers)
(work / f"rank{workers.rank}-of-{workers.world_size}").touch()
"""


@pytest.mark.slow
def test_torchrun_two_processes_train_the_same_stage(tmp_path):
    import os
    import subprocess
    import sys

    cfg = override(get_preset("smoke"), {"train.stage1.grad_accum": 2})
    teacher = get_teacher(cfg, tmp_path / "cache")
    one = train_stage(cfg, "stage1", teacher, tmp_path / "w1_stage1")
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(script), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "rank0-of-2").exists() and (tmp_path / "rank1-of-2").exists()
    weights = max_rel_diff(_weights(one.checkpoint),
                           _weights(tmp_path / "torchrun_stage1" / "final"), norm=True)
    assert weights < WEIGHT_TOLERANCE
