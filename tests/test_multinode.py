"""A campaign on a two-node Ray cluster (issue 13): trials run on the worker node, which
cannot see the driver's MLflow store; only the driver writes MLflow, and the trials' artifacts
reach it through their Ray checkpoints (DESIGN §2, one writer).

Both nodes run on this machine (`ray.cluster_utils.Cluster`): the head node has no CPU, so
every trial lands on the worker node, and the trial function there first installs an audit hook
that refuses every Python file access under the store directory (open, listdir, scandir, mkdir,
sqlite3.connect) — what a node without that file system would see. The trial is the real one
(`run_trial`: smoke stage 1 -> stage 2 -> evaluate).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
from campaign_helpers import plan_for, ratio_arms, write_spec

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

_EVENTS = ("open", "os.listdir", "os.scandir", "os.mkdir", "sqlite3.connect")


def make_hidden_store_trial(store: str, evidence: str):
    def trial_on_worker_node(config):
        import os

        def hook(event, args):
            if (event in _EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike))
                    and os.path.abspath(os.fsdecode(args[0])).startswith(store)):
                raise PermissionError(f"{args[0]}: not visible on this node")

        sys.addaudithook(hook)
        try:
            open(os.path.join(store, "mlflow.db"), "rb").close()
            visible = True
        except PermissionError:
            visible = False
        from sftok_experiments.protocol import trial_key
        from sftok_experiments.trial import run_trial

        run_trial(config)
        Path(evidence, trial_key(config) + ".json").write_text(json.dumps({
            "node": ray.get_runtime_context().get_node_id(), "store_visible": visible,
            "mlflow_imported": "mlflow" in sys.modules}))

    return trial_on_worker_node


@pytest.mark.slow
def test_two_node_campaign_only_the_driver_writes_mlflow(tmp_path):
    from ray.cluster_utils import Cluster
    from sftok_experiments.campaign import Options, run_campaign
    from sftok_experiments.tracking import open_store

    store, evidence = tmp_path / "store", tmp_path / "evidence"
    evidence.mkdir()
    spec_path = write_spec(tmp_path, "two_nodes", arms=ratio_arms([1.0]),
                           evaluation={"decode_steps": [1, 2]})
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    worker = cluster.add_node(num_cpus=2)
    try:
        res = run_campaign(plan_for(spec_path), Options(
            tracking=str(store), work_dir=str(tmp_path / "runs"),
            cache_dir=str(tmp_path / "cache"), ray_address=cluster.address,
            trial_fn=make_hidden_store_trial(str(store.resolve()), str(evidence))))
        head_id = ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert res.exit_code == 0, res.trials
    (trial,) = res.trials
    seen = json.loads((evidence / f"{trial.key}.json").read_text())
    assert seen["node"] == worker.node_id != head_id
    assert seen == {**seen, "store_visible": False, "mlflow_imported": False}
    client = open_store(str(store))[0]
    run = client.get_run(trial.run_id)
    assert run.info.status == "FINISHED" and "eval/psnr_s2" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(trial.run_id)}
    assert {"config.json", "eval.json", "trace.csv", "checkpoint"} <= arts
    assert "checkpoint/model.safetensors" in {
        a.path for a in client.list_artifacts(trial.run_id, "checkpoint")}
