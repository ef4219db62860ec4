"""Data-parallel training (issue 19) on CPU with gloo.

- W = 1 keeps the single-process path bit for bit: the smoke teacher, stages 1-3 and the
  generator trained by this code equal the weights the code before data parallelism produced
  (tests/fixtures/w1_golden.safetensors; bitwise on the platform that wrote it, close elsewhere).
- W = 2 × accumulation 1 equals W = 1 × accumulation 2 up to float reduction order, for stage 1,
  stage 2 (SFVR) and stage 3 with the GAN term and LeCam (final weights and the loss curve); a
  NaN on one rank stops both ranks with one line naming it; a W = 2 run interrupted after a
  checkpoint resumes to the uninterrupted run's weights; W must divide grad_accum.
The two workers are `torch.multiprocessing` processes on a gloo file store; one module fixture
runs them all in one process group (a few seconds on 2 cores).
"""
from __future__ import annotations

import importlib.util
import json
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


def test_a_world_size_that_does_not_divide_the_accumulation_is_refused_before_compute(
        tmp_path, monkeypatch):
    monkeypatch.setattr(stages_mod, "build_stage_task",
                        lambda *a, **k: pytest.fail("no task may be built"))
    cfg = get_preset("smoke")  # grad_accum 1

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


JOBS = {"grads": _job_grads, "stages": _job_stages, "nan": _job_nan, "resume": _job_resume}


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
    mp.spawn(_worker, args=(W, str(work / "store"), str(work), list(JOBS)), nprocs=W,
             join=True)
    outs = [json.loads((work / f"rank{r}.json").read_text()) for r in range(W)]
    for job, result in outs[0].items():
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
