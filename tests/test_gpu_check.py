"""scripts/gpu-check.sh parses, and its dry run prints every step while running none."""

from __future__ import annotations

import os
import subprocess

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "gpu-check.sh"


def test_gpu_check_parses() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_gpu_check_dry_run_prints_the_steps_and_runs_none(tmp_path) -> None:
    work = tmp_path / "check"
    env = os.environ | {"GPU_CHECK_DIR": str(work)}
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        cwd=tmp_path,  # the script finds the repository by itself
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    commands = [line.strip()[2:] for line in out.splitlines() if line.strip().startswith("$ ")]
    assert commands[0] == "make install-gpu"
    for expected in (
        f"write_recipe qlora {work}/recipe-qlora.yaml",
        f"write_recipe none {work}/recipe-none.yaml",
        f"doppel evaluate --user <the most active person> --json > {work}/evaluate-none.json",
        f"doppel serve --engine vllm --port 8090 > {work}/serve.log &",
        f"python benchmarks/serve.py --people 20 --engine vllm --home {work}/serve-bench"
        f" > {work}/bench-serve.json",
        "print_table",
    ):
        assert expected in commands, f"{expected!r} not among {commands}"
    assert [c for c in commands if c.startswith("doppel train ")] == [
        f"doppel train --user <the most active person> --config {work}/recipe-{kind}.yaml"
        for kind in ("qlora", "none")
    ]
    assert any(c.startswith("python benchmarks/train.py ") for c in commands)
    assert out.count("==> ") == 6  # the six steps
    assert not work.exists()  # nothing was run, so nothing was written


def test_gpu_check_refuses_unknown_arguments() -> None:
    done = subprocess.run(
        ["bash", str(SCRIPT), "--dry"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2 and "usage: scripts/gpu-check.sh [--dry-run]" in done.stderr
