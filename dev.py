#!/usr/bin/env python3
"""One entry point for set-up and everyday commands, needing only Python >= 3.11 and pip.

    python dev.py run [SPEC] [ARGS...]   the main job: experiments/run.py (default: ablation_replace_ratio)
    python dev.py test [PYTEST ARGS...]  the test suite
    python dev.py exec CMD [ARGS...]     any command inside the project's environment

The environment is a virtualenv built from ``requirements.lock`` (exact versions of every
package) and keyed by the lock file's hash, so it is built once per machine and lock, shared by
every clone, and rebuilt automatically when the lock changes. ``SFTOK_VENV`` overrides its path.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LOCK = ROOT / "requirements.lock"


def venv_dir() -> Path:
    if os.environ.get("SFTOK_VENV"):
        return Path(os.environ["SFTOK_VENV"]).expanduser()
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "sftok-lab" / f"venv-{digest}"


def ensure_env() -> Path:
    """Create and populate the virtualenv if it is missing or incomplete; return its python."""
    env = venv_dir()
    py = env / "bin" / "python"
    stamp = env / ".sftok-installed"
    # The stamp holds the lock it was built from: a changed lock rebuilds even when the path
    # does not change with it (SFTOK_VENV).
    if not stamp.exists() or stamp.read_text() != LOCK.read_text():
        if os.environ.get("SFTOK_VENV") and env.exists() and any(env.iterdir()) \
                and not stamp.exists():
            sys.exit(f"[dev] SFTOK_VENV={env} is a non-empty directory this script did not "
                     "build; refusing to clear it. Point SFTOK_VENV at a new directory.")
        print(f"[dev] building environment in {env} (first run on this machine: several minutes)",
              flush=True)
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(env)
        except subprocess.CalledProcessError:
            sys.exit("[dev] could not create a virtualenv with pip: this Python lacks ensurepip "
                     "(on Debian/Ubuntu: apt install python3.11-venv)")
        pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        subprocess.run(pip + ["-r", str(LOCK)], check=True)
        stamp.write_text(LOCK.read_text())
    # Editable install of this checkout, unless the environment already points at it (several
    # clones may share one environment; each run re-points it at the clone it is run from).
    # Isolated mode from a neutral directory: the checkout on sys.path via the current
    # directory must not pass for an install (scripts such as experiments/run.py lack it).
    probe = subprocess.run([str(py), "-I", "-c", "import sftok, pathlib; "
                            "print(pathlib.Path(sftok.__file__).resolve().parent.parent)"],
                           capture_output=True, text=True, cwd=str(env))
    if probe.returncode != 0 or Path(probe.stdout.strip()) != ROOT:
        subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                        "--no-deps", "--no-build-isolation", "-e", str(ROOT)], check=True,
                       stdout=subprocess.DEVNULL)
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    cmd, rest = argv[0], argv[1:]
    py = ensure_env()
    env = dict(os.environ, PATH=f"{py.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if cmd == "run":
        if not rest or (rest[0].startswith("-") and rest[0] not in {"--list", "-h", "--help"}):
            # Options alone apply to the default spec, at its own 3 seeds: with the shipped
            # teacher (no stage 0) they fit 15 minutes on 2 cores (README; issue 20).
            rest = ["ablation_replace_ratio", *rest]
        args = [str(py), str(ROOT / "experiments" / "run.py"), *rest]
    elif cmd == "test":
        args = [str(py), "-m", "pytest"] + rest
    elif cmd == "exec":
        if not rest:
            print("usage: python dev.py exec CMD [ARGS...]", file=sys.stderr)
            return 2
        args = rest
    else:
        print(f"unknown command {cmd!r}; see `python dev.py --help`", file=sys.stderr)
        return 2
    return subprocess.run(args, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
