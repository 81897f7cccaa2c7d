"""Ray as the engine for fan-out, against a real local cluster (``ray start --head`` on 127.0.0.1
with two CPUs, stopped at the end): a search's candidates and a fleet of recipes run as Ray tasks
in other processes and give the local run's bytes."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from onnxopt.errors import BadInput
from onnxopt.executor import parse_executor
from test_cli import _assert_clean_error, run_cli
from test_recipe import cnn_case  # noqa: F401  (the fixture: a tiny CNN and labelled data)

ray = pytest.importorskip("ray", reason="ray is installed by `make setup` (the [ray] extra)")

def _free_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and its fixed defaults (52365 and up):
    any free port could be one Ray's other components then want."""
    import random

    for port in random.Random().sample(range(21000, 30000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 21000-29999")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real two-CPU Ray cluster in its own processes; its address."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    start = [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", "--object-store-memory=200000000",
             f"--temp-dir={temp}"]
    # Ray 2.59+ authenticates every client with a token: one for this cluster, in the environment
    # the driver, the CLI subprocesses and the cluster all read
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    res = subprocess.run(start, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, timeout=120)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _variant_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "variants").glob("*.onnx"))}


def test_a_search_on_ray_gives_the_local_search(cluster, cnn_case, tmp_path):
    """The CLI in subprocesses: Ray reads its token from the environment when a process starts."""
    src, data = cnn_case
    args = ["optimize", src, "--data", data, "--max-drop", "5", "--batch", "1", "--duration", "0.2", "--no-memory",
            "--json"]
    local = run_cli(*args, "-o", tmp_path / "local")
    remote = run_cli(*args, "-o", tmp_path / "ray", "--executor", f"ray:{cluster}")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr[-3000:]
    local, remote = json.loads(local.stdout), json.loads(remote.stdout)
    assert remote["executor"] == {"kind": "ray", "address": cluster}
    pids = {v["ran_in"]["pid"] for v in remote["variants"]}
    assert os.getpid() not in pids and len(remote["variants"]) >= 5  # built in the cluster's workers
    assert all("ran_in" not in v for v in local["variants"])
    assert [(v["name"], v["status"], v.get("agreement"), v.get("accuracy")) for v in local["variants"]] == \
           [(v["name"], v["status"], v.get("agreement"), v.get("accuracy")) for v in remote["variants"]]
    a, b = _variant_bytes(tmp_path / "local"), _variant_bytes(tmp_path / "ray")
    assert len(a) >= 5 and a == b  # byte for byte


def _recipes(tmp_path, src, data) -> list[Path]:
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"model: {src}\ndata: {data}\ntarget: {{batch: [1], duration: 0.2}}\n"
                  "steps: [quant-preprocess, quantize-static]\ngates: {max_drop: 50}\n")
    slow = tmp_path / "slow.yaml"
    slow.write_text(f"model: {src}\nsteps: [simplify]\ngates: {{min_speedup: 50}}\ntarget: {{batch: [1], duration: 0.2}}\n")
    return [ok, slow]


def test_a_fleet_on_ray_gathers_one_index_and_keeps_the_exit_codes(cluster, cnn_case, tmp_path):
    src, data = cnn_case
    recipes = _recipes(tmp_path, src, data)
    res = run_cli("run", *recipes, "--executor", f"ray:{cluster}", "-o", tmp_path / "fleet", "--json")
    assert res.returncode == 3, res.stderr  # one recipe failed its gate
    assert "1 of 2 recipe(s) failed a gate" in res.stderr and "Traceback" not in res.stderr
    fleet = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    rows = {Path(r["recipe"]).name: r for r in fleet["recipes"]}
    assert rows["ok.yaml"]["status"] == "ok" and rows["slow.yaml"]["status"] == "gate failed"
    assert all(r["ran_in"]["pid"] != os.getpid() for r in rows.values())
    assert "ok.yaml" in (tmp_path / "fleet" / "fleet.md").read_text()
    ok_only = run_cli("run", recipes[0], "--executor", f"ray:{cluster}", "-o", tmp_path / "fleet-ok")
    assert ok_only.returncode == 0, ok_only.stderr
    local = run_cli("run", *recipes, "-o", tmp_path / "fleet-local")
    assert local.returncode == 3
    assert _variant_bytes(tmp_path / "fleet" / "ok") == _variant_bytes(tmp_path / "fleet-local" / "ok")
    assert _variant_bytes(tmp_path / "fleet" / "ok")


def test_a_bad_input_inside_a_ray_task_is_one_line_exit_2(cluster, cnn_case, tmp_path):
    src, _ = cnn_case
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {src}\ndata: {tmp_path / 'missing.npz'}\nsteps: [quantize-static]\n")
    good = _recipes(tmp_path, *cnn_case)[0]
    res = run_cli("run", good, bad, "--executor", f"ray:{cluster}", "-o", tmp_path / "fleet")
    _assert_clean_error(res, tmp_path / "fleet" / "bad" / "report.json", "missing.npz")


def test_executor_names_are_checked():
    assert parse_executor("ray:10.0.0.1:6379").address == "10.0.0.1:6379"
    with pytest.raises(BadInput, match="--executor"):
        parse_executor("dask")
    res = run_cli("optimize", "digits-cnn", "--executor", "ray")
    assert res.returncode == 2 and "does not search" in res.stderr
