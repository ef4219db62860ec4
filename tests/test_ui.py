"""The MLflow UI's first screen compares a campaign's arms (issue 21).

`run_record.comparison_view` is the runs-table view a campaign shares through the experiment
tag the MLflow 3.17 UI restores (`viewStateShareKey`); `python experiments/run.py ui` prints
(and opens) its address for the newest campaign or the one asked for. Here: the view's content
and that MLflow's own search reads its filter and order as the UI will, and `run.py ui
--print` on a store. What a browser shows is checked by the slow test at the end (headless
Chromium, `scripts/check_ui.py`).
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
from campaign_helpers import ROOT
from sftok_experiments import tracking as trk
from sftok_experiments.cli import main
from sftok_experiments.summary import comparison_metric_keys

from sftok import run_record as rr

PSNR, SSIM, TOP1 = "eval/psnr_s8", "eval/ssim_s8", "eval/token_top1"
FLOOR, CEILING = "eval/floor_tokenizer_psnr", "eval/teacher_psnr"


# --------------------------------------------------------------------------------------------
# The view (pure)
# --------------------------------------------------------------------------------------------


def test_the_view_holds_only_what_the_ui_reads_from_a_shared_view():
    view = rr.comparison_view("p1", [PSNR, SSIM])
    assert set(view) <= set(rr.SHARED_VIEW_FACETS) | set(rr.SHARED_VIEW_UI_STATE)
    assert json.loads(json.dumps(view)) == view  # the tag's value is its JSON
    assert rr.comparison_view_tag("p1") == "mlflow.sharedViewState.p1"


def test_the_view_groups_the_campaigns_children_by_arm_with_its_metric_columns():
    view = rr.comparison_view("p1", [PSNR, SSIM, TOP1, FLOOR, CEILING])
    metrics = ["metrics.`eval/psnr_s8`", "metrics.`eval/ssim_s8`", "metrics.`eval/token_top1`",
               "metrics.`eval/floor_tokenizer_psnr`", "metrics.`eval/teacher_psnr`"]
    assert view["selectedColumns"] == [*metrics, "tags.`seed`"]
    # the summary's order, not the UI's alphabetical one; the run name wide enough for a group
    assert view["columnOrder"] == ["attributes.`Run Name`", *metrics, "tags.`seed`"]
    assert view["columnWidths"] == {"attributes.`Run Name`": rr.RUN_NAME_WIDTH}
    assert view["groupBy"] == {"aggregateFunction": "average",
                               "groupByKeys": [{"mode": "tag", "groupByData": "arm"}]}
    assert view["searchFilter"] == "tags.`mlflow.parentRunId` = 'p1'"
    assert (view["orderByKey"], view["orderByAsc"]) == ("tags.`arm`", True)
    assert view["runsHiddenMode"] == "SHOW_ALL" and view["groupsExpanded"] == {}


def test_a_large_view_fits_an_experiment_tag():
    keys = [f"eval/metric_{i}_s16" for i in range(100)]
    assert len(json.dumps(rr.comparison_view("f" * 32, keys))) < 20000  # MLflow's limit


def test_the_address_opens_the_runs_table_in_the_view():
    assert rr.comparison_address("http://127.0.0.1:5000/", "3", "p1") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?compareRunsMode=TABLE&viewStateShareKey=p1")
    assert rr.comparison_address("http://h:1", "3") == (
        "http://h:1/#/experiments/3/runs?compareRunsMode=TABLE")


def test_the_columns_are_the_summarys_then_floors_and_ceiling_present():
    trial = {"eval/psnr_s1": 1, PSNR: 2, SSIM: 3, "eval/lpips_s8": 4, TOP1: 5,
             FLOOR: 6, "eval/floor_tokenizer_ssim": 7, CEILING: 8, "eval/num_images": 9}
    assert comparison_metric_keys([trial]) == [
        PSNR, SSIM, "eval/lpips_s8", TOP1, FLOOR, "eval/floor_tokenizer_ssim", CEILING]
    with_rfid = {**trial, "eval/rfid_s8": 10.0, "eval/teacher_rfid": 11.0}
    keys = comparison_metric_keys([trial, with_rfid])  # rFID where a trial computed it
    assert keys.index("eval/rfid_s8") == 3 and keys[-1] == "eval/teacher_rfid"
    assert comparison_metric_keys([]) == []


# --------------------------------------------------------------------------------------------
# The view in a store; `run.py ui --print`
# --------------------------------------------------------------------------------------------


def add_campaign(client, spec: str, campaign: str, arms: dict[str, float], seeds: int = 2):
    """A parent run of `spec` with one child per arm and seed, as a campaign records them."""
    exp_id = trk.get_experiment(client, spec, None, "test")
    parent = client.create_run(exp_id, tags=rr.parent_tags(
        spec=spec, preset="smoke", commit="c", dirty=False, command="run.py", campaign=campaign,
        reproduces="test", report="", spec_file="s.yaml", n_trials=len(arms) * seeds))
    pid = parent.info.run_id
    for arm, psnr in arms.items():
        for seed in range(seeds):
            key = f"{arm}_s{seed}"
            child = client.create_run(exp_id, run_name=key, tags=rr.trial_tags(
                parent_id=pid, arm=arm, seed=seed, key=key, spec=spec, preset="smoke",
                ray_trial_id="r", stages=["stage1"], arm_values={}, search_values={}))
            trk.log_metrics(client, child.info.run_id, {PSNR: psnr + seed, TOP1: 0.1,
                                                        FLOOR: 19.0, CEILING: 22.0}, 0)
            client.set_terminated(child.info.run_id)
    client.set_terminated(pid)
    return exp_id, pid


@pytest.fixture(scope="module")
def ui_store(tmp_path_factory):
    """A store with a campaign of spec `ui_b`, then two of spec `ui_a` (the last the newest)."""
    d = tmp_path_factory.mktemp("ui-store")
    client, _ = trk.open_store(str(d))
    exp_b, other = add_campaign(client, "ui_b", "hash-b", {"w=64": 9.0}, seeds=1)
    exp_a, old = add_campaign(client, "ui_a", "hash-old", {"lr=1e-05": 10.0, "lr=3e-05": 11.0})
    _, new = add_campaign(client, "ui_a", "hash-new", {"lr=1e-05": 12.0, "lr=3e-05": 13.0})
    return {"dir": d, "client": client, "exp_a": exp_a, "exp_b": exp_b, "old": old,
            "new": new, "other": other}


@pytest.fixture
def ui_print(capsys):
    """`python experiments/run.py ui --print --port 5123 --tracking-uri STORE ARGS...` ->
    (exit code, stdout, stderr)."""
    def run(store, *args) -> tuple[int, str, str]:
        rc = main(["ui", "--print", "--port", "5123", "--tracking-uri", str(store), *args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return run


def test_the_view_selects_and_orders_what_mlflow_search_does(ui_store):
    """The filter and the order of the view, given to MLflow's search as the UI gives them:
    exactly the campaign's children, in arm order."""
    client, exp = ui_store["client"], ui_store["exp_a"]
    view = rr.comparison_view(ui_store["new"], [PSNR])
    runs = client.search_runs([exp], filter_string=view["searchFilter"],
                              order_by=[f"{view['orderByKey']} ASC"])
    assert len(runs) == 4 and {rr.parent_of(r.data.tags) for r in runs} == {ui_store["new"]}
    arms = [r.data.tags["arm"] for r in runs]
    assert arms == sorted(arms) == ["lr=1e-05", "lr=1e-05", "lr=3e-05", "lr=3e-05"]


def test_ui_print_gives_the_newest_campaigns_comparison(ui_store, ui_print):
    rc, out, err = ui_print(ui_store["dir"])
    assert rc == 0, err
    new, exp = ui_store["new"], ui_store["exp_a"]
    lines = out.splitlines()
    assert "mlflow ui --backend-store-uri sqlite:///" in lines[0] and "--port 5123" in lines[0]
    assert lines[1] == f"the arms of campaign {new} (spec ui_a, 4 trials, FINISHED):"
    assert lines[2] == (f"  http://127.0.0.1:5123/#/experiments/{exp}/runs?compareRunsMode=TABLE"
                        f"&viewStateShareKey={new}")
    # A campaign recorded without a view gets one, its columns from its children's metrics.
    tags = ui_store["client"].get_experiment(exp).tags
    assert json.loads(tags[rr.comparison_view_tag(new)]) == rr.comparison_view(
        new, [PSNR, TOP1, FLOOR, CEILING])


@pytest.mark.parametrize("how", ["run id", "campaign hash", "experiment"])
def test_ui_print_chooses_another_campaign(ui_store, ui_print, how):
    args, want, exp = {
        "run id": (["--campaign", ui_store["old"]], ui_store["old"], ui_store["exp_a"]),
        "campaign hash": (["--campaign", "hash-old"], ui_store["old"], ui_store["exp_a"]),
        "experiment": (["--experiment", "ui_b"], ui_store["other"], ui_store["exp_b"]),
    }[how]
    rc, out, err = ui_print(ui_store["dir"], *args)
    assert rc == 0, err
    assert out.splitlines()[2].endswith(f"/#/experiments/{exp}/runs?compareRunsMode=TABLE"
                                        f"&viewStateShareKey={want}")


def test_ui_print_says_what_is_not_there(ui_store, ui_print, tmp_path):
    rc, out, err = ui_print(ui_store["dir"], "--campaign", "no-such-campaign")
    assert rc == 2 and out == ""
    assert err.strip() == (f"error: no campaign no-such-campaign in sqlite:///{ui_store['dir']}/"
                           "mlflow.db (`python experiments/run.py ui` without --campaign / "
                           "--experiment opens the newest)")
    rc, out, _ = ui_print(tmp_path / "empty")  # no store yet: the UI's start page
    assert rc == 0 and out.splitlines()[1:] == [
        f"no campaign in {tmp_path / 'empty'} yet: the UI's start page:",
        "  http://127.0.0.1:5123"]
    assert not (tmp_path / "empty").exists()  # --print made nothing
    rc, _, err = ui_print(tmp_path / "empty", "--experiment", "ui_a")
    assert rc == 2 and err.strip() == f"error: no MLflow store at {tmp_path / 'empty'}"


def test_a_store_that_cannot_take_the_view_still_gets_the_runs_table(ui_store, ui_print,
                                                                     monkeypatch):
    """E.g. a read-only copy of a store recorded before views existed."""
    def read_only(*_a, **_k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(trk, "share_comparison", read_only)
    client, exp, old = ui_store["client"], ui_store["exp_a"], ui_store["old"]
    client.delete_experiment_tag(exp, rr.comparison_view_tag(old))
    rc, out, _ = ui_print(ui_store["dir"], "--campaign", old)
    out = out.splitlines()
    assert rc == 0
    assert out[1].startswith(f"the arms of campaign {old} (spec ui_a, 4 trials, FINISHED), "
                             "without its comparison view (it could not be written to the "
                             "store: ") and "Read-only file system" in out[1]
    assert out[2] == f"  http://127.0.0.1:5123/#/experiments/{exp}/runs?compareRunsMode=TABLE"


# --------------------------------------------------------------------------------------------
# What scripts/check_ui.py reads from a page (on a DOM made here)
# --------------------------------------------------------------------------------------------


def _check_ui():
    spec = importlib.util.spec_from_file_location("check_ui", ROOT / "scripts" / "check_ui.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _header(key: str, index: int) -> str:
    return (f'<div class="ag-header-cell ag-focus-managed" col-id="metrics.`{key}`" '
            f'aria-colindex="{index}" role="columnheader"><span>{key}</span></div>')


def _page(cells: list[str], body: str) -> str:
    return f"<html><body><h2>Training runs</h2>{''.join(cells)}{body}</body></html>"


def test_the_browser_check_reads_the_column_order_on_screen_not_in_the_dom():
    """ag-grid keeps header cells in definition order (the UI's alphabetical one) and places
    them by aria-colindex: the order on screen is the index's."""
    check = _check_ui()
    on_screen = [PSNR, TOP1, FLOOR]
    dom = _page([_header(FLOOR, 5), _header(PSNR, 3), _header(TOP1, 4)], "Group: a Group: b "
                + check.SHARED_VIEW_BANNER)
    assert check.metric_headers(dom) == on_screen
    assert all(check.checks(dom, ["a", "b"], on_screen).values())
    got = check.checks(dom, ["a", "b"], [FLOOR, PSNR, TOP1])  # the DOM's order: not shown
    assert [k for k, ok in got.items() if not ok] == [
        f"every metric column of the view, in its order ({FLOOR}, {PSNR}, {TOP1})"]


def test_the_browser_check_fails_on_the_genai_overview():
    """The experiment's root in MLflow 3.17 (what issue 21 found): every check of the first
    screen fails."""
    check = _check_ui()
    overview = ("<html><body><h2>Overview</h2>Traces 0 Latency Token Usage Tokens per Trace "
                "Detect Issues in your traces</body></html>")
    assert not any(check.checks(overview, ["a"], [PSNR]).values())


# --------------------------------------------------------------------------------------------
# In a browser (slow): a smoke campaign's store, headless Chromium
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="no chromium (Debian: apt-get install chromium)")
def test_the_first_screen_compares_the_arms_in_a_browser(tmp_path):
    """`run.py ablation_replace_ratio --preset smoke --seeds 2`, then `scripts/check_ui.py`:
    the address `run.py ui` prints shows the runs table of the campaign in its shared view, a
    row group per arm, every metric column in order, not the GenAI overview; the UI stops with
    `run.py ui`."""
    store = tmp_path / "store"
    run = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run.py"), "ablation_replace_ratio",
         "--preset", "smoke", "--seeds", "2", "--progress-every", "-1", "--tracking-uri",
         str(store), "--work-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_ui.py"), "--tracking-uri", str(store),
         "--screenshot", str(tmp_path / "ui.png")],
        capture_output=True, text=True, timeout=900, check=False)
    assert check.returncode == 0, check.stdout[-5000:] + check.stderr[-3000:]
    assert "FAIL" not in check.stdout and check.stdout.count("\nok   ") == 6
    for arm in ("replace_ratio=0.5", "replace_ratio=0.8", "replace_ratio=1.0"):
        assert f"Group: {arm}" in check.stdout
    assert (tmp_path / "ui.png").stat().st_size > 10_000
