"""Where a trial runs: its device, chosen from the GPU share Ray gave it, and the record of it.

Ray hands a trial GPU *ids* (`ray.get_gpu_ids()`), and by default sets the worker's
`CUDA_VISIBLE_DEVICES` to exactly those ids, so the trial's own GPU is `cuda:0` in the worker.
With `RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1` Ray leaves the node's
`CUDA_VISIBLE_DEVICES` (unset: all GPUs) to every worker, and the trial's GPU is
`cuda:<index of its id in that list>` — putting every trial on `cuda:0` there would stack them
all on one card. `select_device` is a pure function of those inputs (tested without a GPU,
tests/test_gpu_scheduling.py); `trial_placement` reads them inside a running trial (which
reports them through `protocol.place_trial`).

Policy when a trial holds a GPU share but its node has no CUDA: the trial fails with one line
naming the node and the fixes (DeviceUnavailableError); it runs on CPU only when the user asked
for that (`--device cpu`). A trial without a GPU share runs on CPU under "auto", because Ray
leaves `CUDA_VISIBLE_DEVICES` set for zero-GPU workers and "auto" would otherwise put it on a GPU
it was not given.

Every trial reports, as tags of its MLflow run (`placement.*`, see `placement_tags`): the node
and its IP, the Ray GPU ids and `CUDA_VISIBLE_DEVICES` it saw, its GPU share, the CUDA device
its share maps to (`gpu_slot`), the device it chose, the GPU model when it runs on CUDA, and its
start and end times (Unix seconds; the end comes with the final report).
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TAG_PREFIX = "placement."


class DeviceUnavailableError(RuntimeError):
    """The trial's device does not exist on the node it was scheduled on."""


def gpu_slot(gpu_ids: Sequence[int | str], visible: str | None) -> int | None:
    """Index, among the CUDA devices this process sees, of the first GPU Ray assigned it.

    gpu_ids: `ray.get_gpu_ids()` (ints, or strings such as UUIDs); visible: the worker's
    `CUDA_VISIBLE_DEVICES` (None when unset: every physical GPU is visible in id order).
    None when the trial holds no GPU. A trial trains on one device: with several ids (e.g.
    `--gpus-per-trial 2`) the others are reserved but unused.
    """
    if not gpu_ids:
        return None
    first = str(gpu_ids[0]).strip()
    if visible is None or not visible.strip():
        return int(first)
    listed = [v.strip() for v in visible.split(",")]
    if first not in listed:
        raise DeviceUnavailableError(
            f"Ray gave this trial GPU {first} but CUDA_VISIBLE_DEVICES={visible} does not list "
            "it: do not override CUDA_VISIBLE_DEVICES inside trials (Ray sets it)")
    return listed.index(first)


def select_device(requested: str, gpu_ids: Sequence[int | str], visible: str | None,
                  cuda_available: bool, node: str) -> str:
    """The torch device string a trial uses (a pure function; module docstring for the policy).

    requested: "auto" (the default), "cpu", "cuda" (the trial's own GPU) or an explicit
    "cuda:N", which is kept as given (it bypasses Ray's assignment).
    """
    if requested == "cpu":
        return "cpu"
    explicit = requested.startswith("cuda:")
    if requested not in ("auto", "cuda") and not explicit:
        return requested  # another backend named by the user (e.g. "mps"): torch decides
    if not gpu_ids and requested == "auto":
        return "cpu"
    if not cuda_available:
        share = f"GPU {','.join(map(str, gpu_ids))} from Ray" if gpu_ids else "no GPU share"
        raise DeviceUnavailableError(
            f"trial on node {node} has {share} and device {requested!r}, but CUDA is not "
            "available there: install a CUDA build of torch on that node, or run with "
            "--device cpu (CPU on purpose) or --gpus-per-trial 0")
    if explicit:
        return requested
    if not gpu_ids:  # "cuda" without a share: Ray reserved nothing for this trial
        raise DeviceUnavailableError(
            f"trial on node {node} asks for device 'cuda' but holds no GPU share: pass "
            "--gpus-per-trial > 0 so Ray assigns it a GPU, or use device 'auto'")
    return f"cuda:{gpu_slot(gpu_ids, visible)}"


def gpu_shortfall(gpus_per_trial: float, node_gpus: float) -> str | None:
    """The one-line error when not even one trial's GPU share fits this machine's Ray, else None."""
    if gpus_per_trial <= node_gpus:
        return None
    return (f"--gpus-per-trial {gpus_per_trial:g} but Ray found {node_gpus:g} GPU(s) on this "
            "machine, so no trial could start: lower --gpus-per-trial (0 runs on CPU), or "
            "attach to a cluster with GPUs via --ray-address")


@dataclass(frozen=True)
class Placement:
    """What a running trial observed about where it runs (read by `observe`)."""

    node: str
    node_ip: str
    gpu_ids: tuple[str, ...]
    visible: str | None  # CUDA_VISIBLE_DEVICES, None when unset
    cuda_available: bool
    gpu_share: float | None
    start: float


def observe(gpu_share: float | None = None) -> Placement:
    """The live placement of the calling Ray trial (or task)."""
    import ray
    import torch

    try:
        node_ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 — informational only
        node_ip = ""
    return Placement(platform.node(), node_ip, tuple(str(i) for i in ray.get_gpu_ids()),
                     os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.is_available(),
                     gpu_share, time.time())


def placement_tags(p: Placement, device: str | None) -> dict[str, str]:
    """The `placement.*` tags of a trial's run; device None: no device could be chosen."""
    try:
        slot = gpu_slot(p.gpu_ids, p.visible)
        slot_tag = "none" if slot is None else f"cuda:{slot}"
    except DeviceUnavailableError:  # its id is not among the visible devices (recorded as is)
        slot_tag = "not visible"
    tags = {"node": p.node, "node_ip": p.node_ip, "ray_gpu_ids": ",".join(p.gpu_ids),
            "cuda_visible_devices": "<unset>" if p.visible is None else p.visible,
            "cuda_available": str(p.cuda_available).lower(), "gpu_slot": slot_tag,
            "device": device or "none", "start": f"{p.start:.3f}"}
    if p.gpu_share is not None:
        tags["gpu_share"] = f"{p.gpu_share:g}"
    if device and device.startswith("cuda"):
        import torch

        tags["gpu_model"] = torch.cuda.get_device_name(device)
    return {TAG_PREFIX + k: v for k, v in tags.items()}


def trial_placement(requested: str, gpu_share: float | None,
                    report: Callable[[dict[str, str]], None]) -> str:
    """Inside a trial: choose its device, `report` where it runs (the tags), return the device.

    The tags are reported before a DeviceUnavailableError is raised, so a failed run still
    shows the node and GPU ids it got.
    """
    p = observe(gpu_share)
    try:
        device = select_device(requested, p.gpu_ids, p.visible, p.cuda_available, p.node)
    except DeviceUnavailableError:
        report(placement_tags(p, None))
        raise
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)  # bare "cuda" tensors elsewhere land on the same GPU
    report(placement_tags(p, device))
    return device


def end_tag() -> dict[str, str]:
    """The trial's end time, sent with its final report."""
    return {TAG_PREFIX + "end": f"{time.time():.3f}"}
