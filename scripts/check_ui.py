"""Open `python experiments/run.py ui` in a real (headless) browser and check its first screen.

Starts the UI on a store (`--tracking-uri`, default ./mlruns) for a campaign (`--campaign`,
`--experiment`; default the newest), loads the address it prints in headless Chromium (Debian's
`chromium` package, or `$CHROMIUM`), saves a screenshot and checks the page's text: the runs
table ("Training runs") in the campaign's shared view, a row group per arm ("Group: <arm>"),
every metric column of the view in its order, and not the GenAI overview (traces, token usage)
the experiment's root shows; then that the UI stops with `run.py ui`. Prints what the first
screen says. Exit 0 when every check passes, 1 when one fails, 77 without a browser.

    python scripts/check_ui.py --tracking-uri /tmp/store --screenshot /tmp/ui.png
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

from sftok_experiments import tracking as trk

from sftok import run_record as rr

# What the GenAI overview (the experiment's root in MLflow 3.17) shows and the runs table not.
OVERVIEW_MARKERS = ("Token Usage", "Detect Issues", "Tokens per Trace")
# The UI's banner over a view restored from `viewStateShareKey` (an unknown key: an error
# notification and the experiment's root instead).
SHARED_VIEW_BANNER = "You're viewing a shared view"
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1920,1080", "--virtual-time-budget=15000")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")


def page_text(dom: str) -> str:
    """The visible text of a dumped DOM, on one line."""
    dom = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.DOTALL)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", dom)).split())


def load(chromium: str, url: str, screenshot: Path) -> str:
    """The page's DOM after its scripts ran (and a screenshot of it)."""
    out = []
    for action in (f"--screenshot={screenshot}", "--dump-dom"):
        with tempfile.TemporaryDirectory(prefix="sftok-chromium-") as profile:
            done = subprocess.run([chromium, *BROWSER_FLAGS, f"--user-data-dir={profile}",
                                   action, url], capture_output=True, text=True, timeout=180,
                                  check=False)
        out.append(done.stdout)
    return out[-1]


def serve_and_load(ui: subprocess.Popen, log: Path, port: int, chromium: str,
                   screenshot: Path) -> tuple[str | None, str]:
    """(address, page DOM) once the UI started by `ui` answers; (None, why) if it does not."""
    url, deadline = None, time.time() + 180
    while url is None and time.time() < deadline and ui.poll() is None:
        time.sleep(0.5)
        url = next((ln.strip() for ln in log.read_text().splitlines()
                    if ln.startswith(f"  http://127.0.0.1:{port}")), None)
    if url is None:
        return None, f"run.py ui printed no address:\n{log.read_text()[-2000:]}"
    while not answers(port):
        if time.time() > deadline:
            return None, "the UI did not answer within 180 s"
        time.sleep(1)
    return url, load(chromium, url, screenshot)


def expected(tracking: str | None, campaign: str | None, experiment: str | None
             ) -> tuple[list[str], list[str]]:
    """(the campaign's arm labels, its view's metric columns) from the store."""
    client = trk.client_for(rr.store_location(tracking).uri)
    found = trk.find_campaign(client, campaign, experiment)
    if found is None:
        raise SystemExit(f"no campaign in {rr.store_location(tracking).uri}: run one first")
    exp_id, parent = found
    trk.comparison_of(client, exp_id, parent)
    view = json.loads(client.get_experiment(exp_id).tags[
        rr.comparison_view_tag(parent.info.run_id)])
    metrics = [c.split("`")[1] for c in view["selectedColumns"] if c.startswith("metrics.")]
    children = rr.search_all(client, [exp_id], rr.children_filter(parent.info.run_id))
    return sorted({r.data.tags[rr.ARM_TAG] for r in children}), metrics


# An ag-grid header cell: its column id and its place on screen. The DOM keeps the cells in the
# grid's definition order (the UI's: alphabetical) and places them by `aria-colindex`, so the
# order the screen shows is that index, not the order of the text.
HEADER_CELL = re.compile(r'<div[^>]*\bag-header-cell\b[^>]*>')
HEADER_ATTRS = re.compile(r'\b(col-id|aria-colindex)="([^"]*)"')


def metric_headers(dom: str) -> list[str]:
    """The metric keys of the table's header cells, in their order on screen."""
    cells = []
    for m in HEADER_CELL.finditer(dom):
        attrs = dict(HEADER_ATTRS.findall(m.group(0)))
        col = html.unescape(attrs.get("col-id", ""))
        if col.startswith("metrics.`") and attrs.get("aria-colindex", "").isdigit():
            cells.append((int(attrs["aria-colindex"]), col.split("`")[1]))
    return [key for _, key in sorted(cells)]


def checks(dom: str, arms: list[str], metrics: list[str]) -> dict[str, bool]:
    """What the first screen must show (name -> passed)."""
    text = page_text(dom)
    return {"the runs table ('Training runs')": "Training runs" in text,
            "the campaign's shared view (not the default one)": SHARED_VIEW_BANNER in text,
            f"a row group per arm ({len(arms)}: 'Group: <arm>')":
                all(f"Group: {arm}" in text for arm in arms),
            f"every metric column of the view, in its order ({', '.join(metrics)})":
                bool(metrics) and metric_headers(dom) == metrics,
            "not the GenAI overview": not any(m in text for m in OVERVIEW_MARKERS)}


def answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
        return True
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri")
    p.add_argument("--campaign")
    p.add_argument("--experiment")
    p.add_argument("--screenshot", type=Path, default=Path("ui_first_screen.png"))
    a = p.parse_args()
    chromium = browser()
    if chromium is None:
        print("no browser: install Debian's chromium (apt-get install chromium) or set "
              "CHROMIUM=/path/to/chromium", file=sys.stderr)
        return 77
    arms, metrics = expected(a.tracking_uri, a.campaign, a.experiment)
    port = free_port()
    cmd = [sys.executable, str(ROOT / "experiments" / "run.py"), "ui", "--no-browser",
           "--port", str(port)]
    for flag, value in (("--tracking-uri", a.tracking_uri), ("--campaign", a.campaign),
                        ("--experiment", a.experiment)):
        cmd += [flag, value] if value else []
    with tempfile.NamedTemporaryFile("w+", prefix="sftok-ui-", suffix=".log") as log:
        ui = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)  # a file: never blocks
        try:
            url, dom = serve_and_load(ui, Path(log.name), port, chromium, a.screenshot)
        finally:
            ui.terminate()  # `run.py ui` stops its server on SIGTERM
            ui.wait(timeout=30)
    if url is None:
        print(dom, file=sys.stderr)  # why
        return 1
    results = checks(dom, arms, metrics)
    deadline = time.time() + 30
    while answers(port) and time.time() < deadline:
        time.sleep(1)
    results["the UI stopped with `run.py ui`"] = not answers(port)
    print(f"address: {url}\nscreenshot: {a.screenshot}")
    print(f"metric columns on screen: {', '.join(metric_headers(dom)) or 'none'}")
    text = page_text(dom)
    start = text.find("Training runs")
    print(f"first screen: {text[start:start + 1500] if start >= 0 else text[:1500]}")
    for what, ok in results.items():
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
