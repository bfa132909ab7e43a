"""`distlm launch slurm|k8s` without a cluster: the sbatch script and the KubeRay manifests.

The manifests are checked against KubeRay's own CRD schemas (the API server's check), the
entry points are composed back into configs, and `--apply` runs a stand-in `kubectl` (no
Kubernetes API server can run here). Submitting to a real Slurm is in test_slurm.py.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import jsonschema
import pytest
import yaml
from helpers import REPO, TINY, run_cli

from distlm.config import compose
from distlm.launch import LaunchOptions, launch

CRDS = REPO.parent / "shared" / "reference" / "kuberay-crds"
GPU_CLUSTER = [
    "cluster.nodes=4",
    "cluster.gpus_per_node=8",
    "cluster.cpus_per_node=32",
    "trainer.global_batch_size=256",
]


def dry_run(capsys, target: str, *overrides: str, multirun: bool = False) -> str:
    assert launch(LaunchOptions(target, list(overrides), dry_run=True, multirun=multirun)) == 0
    return capsys.readouterr().out


def train_command(script: str) -> List[str]:
    """The `distlm train ...` line of an sbatch script, as argv."""
    (line,) = [x for x in script.splitlines() if x.strip().startswith("distlm train ")]
    argv = shlex.split(line.strip().removesuffix("&"))
    assert argv[:2] == ["distlm", "train"]
    return argv[2:]


# --- Slurm ---------------------------------------------------------------------------


def test_sbatch_script_for_a_gpu_cluster(capsys, tmp_path):
    run_dir = tmp_path / "run"
    script = dry_run(
        capsys,
        "slurm",
        *TINY,
        *GPU_CLUSTER,
        f"hydra.run.dir={run_dir}",
        "cluster.slurm.partition=gpu",
        "cluster.slurm.account=proj1",
        "cluster.slurm.time=1-00:00:00",
        "cluster.slurm.qos=high",
        "cluster.slurm.constraint=h100",
        "cluster.slurm.mem=400G",
        "cluster.slurm.sbatch_args=[--exclusive,'--mail-type=END']",
        "cluster.slurm.setup=[module load cuda/12.4,source /shared/venv/bin/activate]",
    )
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for expected in [
        "--nodes=4",
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--account=proj1",
        "--time=1-00:00:00",
        "--qos=high",
        "--constraint=h100",
        "--mem=400G",
        "--exclusive",
        "--mail-type=END",
        "--requeue",
        "--signal=B:TERM@120",
        f"--output={run_dir}/slurm-%j.out",
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
    ]:
        assert f"#SBATCH {expected}" in directives, expected
    # Slurm reads #SBATCH lines only before the first command.
    first_command = next(i for i, line in enumerate(script.splitlines()[1:], 1) if line and not line.startswith("#"))
    assert all(script.splitlines().index(d) < first_command for d in directives)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    # The environment set-up comes before anything that needs it; the default PATH line is replaced.
    assert script.index("module load cuda/12.4\nsource /shared/venv/bin/activate\n") < script.index("python -c")
    assert "export PATH=" not in script
    # Ray: head with srun on the first node, the others join it, GPUs and CPUs per node.
    assert "--num-cpus=32 --num-gpus=8" in script
    assert 'srun_node "${nodes[0]}" --head' in script and 'srun_node "${node}" --address="${RAY_ADDRESS}"' in script
    # The job's `distlm train` composes to this run: 32 workers, the same (fixed) run dir.
    args = train_command(script)
    assert args[0] == "cluster=slurm" and f"hydra.run.dir={run_dir}" in args
    cfg, _ = compose(args)
    assert cfg.cluster.num_workers == 32 and cfg.run_dir == str(run_dir)
    assert cfg.cluster.slurm.partition == "gpu"


def test_sbatch_defaults_to_the_launching_environment(capsys, tmp_path):
    script = dry_run(capsys, "slurm", *TINY, f"hydra.run.dir={tmp_path}/run", "cluster.slurm.requeue=false")
    assert f'export PATH={Path(sys.executable).parent}:"$PATH"' in script
    assert "--requeue" not in script and "trap on_term TERM" not in script
    assert "#SBATCH --nodes=1" in script and "--gpus-per-node" not in script
    cfg, _ = compose(train_command(script))
    assert cfg.cluster.name == "slurm" and cfg.cluster.num_workers == 2  # 2 CPUs per node, 1 per worker


def test_sweep_submits_one_job_per_point(capsys):
    out = dry_run(capsys, "slurm", *TINY, "trainer.lr=1e-3,3e-3", "trainer.max_steps=4,6", multirun=True)
    scripts = out.split("#!/bin/bash")[1:]
    assert len(scripts) == 4
    points = [compose(train_command(s))[0] for s in scripts]
    assert sorted((p.trainer.lr, p.trainer.max_steps) for p in points) == [(1e-3, 4), (1e-3, 6), (3e-3, 4), (3e-3, 6)]
    run_dirs = [Path(p.run_dir) for p in points]
    assert len({d.parent for d in run_dirs}) == 1 and sorted(d.name for d in run_dirs) == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.num_workers=4", "trainer.global_batch_size=8"], "cluster.num_workers=4 does not fit"),
        (
            [
                "cluster.nodes=2",
                "cluster.num_workers=3",
                "trainer.global_batch_size=6",
                "cluster.placement_strategy=STRICT_SPREAD",
            ],
            "STRICT_SPREAD",
        ),
        (["cluster.slurm.sbatch_args=[exclusive]"], "write it as --exclusive"),
        (
            ["cluster.nodes=0", "cluster.num_workers=1", "trainer.global_batch_size=2"],
            "cluster.nodes=0 must be at least 1",
        ),
        (["cluster.slurm.signal_grace_s=0"], "signal_grace_s"),
        (["hydra.run.dir=/tmp/x", "trainer.lr=1e-3,2e-3", "-m"], "hydra.sweep.dir"),
        (["trainer.global_batch_size=10"], "trainer.global_batch_size=10"),
        (["trainer.resume=never"], "cluster.slurm.requeue=true needs trainer.resume=auto"),
    ],
)
def test_bad_launches_fail_before_submitting(overrides, message):
    multirun = "-m" in overrides
    args = ["launch", "slurm", *(["-m"] if multirun else []), *TINY, *[o for o in overrides if o != "-m"]]
    result = run_cli(*args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and result.stderr.startswith("distlm: error:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_submit_without_slurm_says_so(tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on it
    result = run_cli("launch", "slurm", *TINY, f"hydra.run.dir={tmp_path}/run", env=env, timeout=120)
    assert result.returncode == 1
    assert "sbatch is not on PATH" in result.stderr


# --- Kubernetes ----------------------------------------------------------------------


@functools.cache
def crd_schema(kind: str) -> Dict[str, Any]:
    # The CRDs are megabytes of YAML: libyaml's loader reads them in a fraction of the time.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(doc: Any, schema: Dict[str, Any], path: str = "") -> List[str]:
    """Keys the schema does not define: `kubectl apply` (strict field validation) rejects them,
    while a JSON-schema check alone lets them through."""
    found: List[str] = []
    if isinstance(doc, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, value in doc.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def check_against_crd(doc: Dict[str, Any]) -> None:
    schema = crd_schema(doc["kind"])
    jsonschema.validate(doc, schema)
    assert unknown_fields(doc, schema) == []
    assert doc["apiVersion"] == "ray.io/v1"
    # Kubernetes object names: DNS-1123, short enough for KubeRay's generated cluster names.
    assert (
        re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 40
    )


def test_schema_check_catches_mistakes():
    """The checks above can fail: a wrong type and a misspelled field are caught."""
    good = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}, "spec": {"entrypoint": "x"}}
    check_against_crd(good)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "spec": {"entrypoint": 3}}, crd_schema("RayJob"))
    assert unknown_fields({**good, "spec": {"entrypiont": "x"}}, crd_schema("RayJob")) == [".spec.entrypiont"]


K8S_OVERRIDES = [
    *GPU_CLUSTER[:2],
    "cluster.cpus_per_node=16",
    "trainer.global_batch_size=128",
    "cluster.k8s.image=registry.example.com/distlm:0.1.0",
    "cluster.k8s.namespace=ml",
    "cluster.k8s.pvc=shared-runs",
    "++cluster.k8s.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
    "cluster.k8s.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    "cluster.k8s.volumes=[{name: datasets, persistentVolumeClaim: {claimName: datasets, readOnly: true}}]",
    "cluster.k8s.volume_mounts=[{name: datasets, mountPath: /data, readOnly: true}]",
    "cluster.k8s.env=[{name: WANDB_API_KEY, valueFrom: {secretKeyRef: {name: wandb, key: api-key}}}]",
    "experiment=pretrain_tiny",
    "serve.max_batch_size=16",
]


def test_k8s_manifests_are_valid_kuberay_objects(capsys):
    out = dry_run(capsys, "k8s", *K8S_OVERRIDES)
    job, service = list(yaml.safe_load_all(out))
    assert (job["kind"], service["kind"]) == ("RayJob", "RayService")
    for doc in (job, service):
        check_against_crd(doc)
        assert doc["metadata"]["namespace"] == "ml"

    cluster = job["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    worker = workers["template"]["spec"]
    limits = worker["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and limits["cpu"] == "16"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the driver only
    for pod in (cluster["headGroupSpec"]["template"]["spec"], worker):
        container = pod["containers"][0]
        assert container["image"] == "registry.example.com/distlm:0.1.0"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert volumes["distlm-runs"]["persistentVolumeClaim"]["claimName"] == "shared-runs"
        assert mounts["distlm-runs"] == "/mnt/distlm" and mounts["datasets"] == "/data"
        assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "wandb"

    # The entry point is a `distlm train` that composes to this run, with its outputs on the volume.
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["distlm", "train"]
    cfg, _ = compose(argv[2:])
    assert cfg.cluster.name == "k8s" and cfg.cluster.num_workers == 32
    assert cfg.run_dir.startswith("/mnt/distlm/runs/") and cfg.data.cache_dir == "/mnt/distlm/runs/.cache"
    assert cfg.model.name == "tiny"

    # The RayService serves that run dir with distlm's Ray Serve app builder, taking our arguments.
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    assert app["import_path"] == "distlm.serve.app:build_app"
    assert app["args"]["path"] == cfg.run_dir and app["args"]["max_batch_size"] == 16
    from distlm.serve.app import build_app
    from distlm.serve.app import serve_config as parse_serve_args

    assert callable(build_app)
    parsed = parse_serve_args({k: v for k, v in app["args"].items() if k != "path"})
    assert parsed.max_batch_size == 16
    assert serve_config["http_options"] == {"host": "0.0.0.0", "port": 8000}


def fake_kubectl(tmp_path: Path, exit_code: int = 0) -> Dict[str, str]:
    """A `kubectl` first on PATH that records its arguments and the applied file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "kubectl.jsonl"
    script = bin_dir / "kubectl"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "args = sys.argv[1:]\n"
        "applied = open(args[args.index('-f') + 1]).read() if '-f' in args else None\n"
        f"open({str(record)!r}, 'a').write(json.dumps({{'args': args, 'applied': applied}}) + '\\n')\n"
        "print('rayjob.ray.io/x created')\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "KUBECTL_RECORD": str(record)}


def kubectl_calls(env: Dict[str, str]) -> List[Dict[str, Any]]:
    path = Path(env["KUBECTL_RECORD"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_k8s_apply_runs_kubectl_apply(tmp_path):
    env = fake_kubectl(tmp_path)
    out = tmp_path / "manifests"
    result = run_cli("launch", "k8s", "--apply", "--out", str(out), *K8S_OVERRIDES, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    (call,) = kubectl_calls(env)
    assert call["args"] == ["apply", "-f", str(out / "rayjob.yaml")]
    applied = yaml.safe_load(call["applied"])
    assert applied["kind"] == "RayJob"
    check_against_crd(applied)
    assert "rayjob.ray.io/x created" in result.stdout

    result = run_cli("launch", "k8s", "--apply", "--serve", "--out", str(out), *K8S_OVERRIDES, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert kubectl_calls(env)[-1]["args"] == ["apply", "-f", str(out / "rayservice.yaml")]
    assert yaml.safe_load((out / "rayservice.yaml").read_text())["kind"] == "RayService"


def test_k8s_apply_failure_reaches_the_user(tmp_path):
    env = fake_kubectl(tmp_path, exit_code=1)
    result = run_cli("launch", "k8s", "--apply", "--out", str(tmp_path / "m"), *TINY, env=env, timeout=120)
    assert result.returncode == 1
    assert "kubectl apply -f" in result.stderr and "failed (1)" in result.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.k8s.tolerations=[{effect: NoSchedule}]"], "cluster.k8s.tolerations[0]"),
        (["cluster.k8s.mount_path=data"], "absolute path"),
        (
            ["cluster.gpus_per_node=4", "cluster.num_workers=8", "trainer.global_batch_size=16"],
            "cluster.num_workers=8 does not fit",
        ),
    ],
)
def test_bad_k8s_launches_fail(overrides, message):
    result = run_cli("launch", "k8s", "--dry-run", *TINY, *overrides, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_cluster_groups_fill_the_nodes():
    def workers(*overrides: str) -> int:
        return compose([*overrides, "trainer.micro_batch_size=1", "trainer.global_batch_size=48"])[
            0
        ].cluster.num_workers

    assert workers("cluster=slurm", "cluster.nodes=3", "cluster.cpus_per_node=4", "cluster.cpus_per_worker=2") == 6
    assert workers("cluster=k8s", "cluster.nodes=2", "cluster.gpus_per_node=8") == 16
    assert workers("cluster=slurm", "cluster.nodes=3", "cluster.num_workers=2") == 2  # an explicit count wins
    assert workers("cluster=local") == 2


# --- Docker images (no engine here: the files are checked for what a build relies on) ---


def _force_included() -> List[str]:
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[tool.hatch.build.targets.wheel.force-include]", 1)[1].split("\n[", 1)[0]
    return re.findall(r'^"([^"]+)" = ', section, flags=re.M)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_install_distlm_on_the_pinned_torch(name):
    text = (REPO / "docker" / name).read_text()
    copied = {src for line in text.splitlines() if line.startswith("COPY ") for src in line.split()[1:-1]}
    # Everything the wheel is built from, including pyproject's force-included dirs (conf, launch).
    assert {"pyproject.toml", "README.md", "distlm", *_force_included()} <= copied
    assert set(_force_included()) >= {"conf", "launch"}
    # The torch build is installed first, from PyTorch's index, so distlm's torch>=2.4 keeps it.
    torch = next(line for line in text.splitlines() if "torch==" in line and "pip install" in line)
    assert "--index-url" in torch and text.index(torch) < text.index("pip install .")
    assert 'ENTRYPOINT ["distlm"]' in text
    if name == "Dockerfile":
        # nvcc for DeepSpeed's ops, and a torch built for the base image's CUDA version.
        base = re.search(r"CUDA_IMAGE=nvidia/cuda:(\d+)\.(\d+)[.\d]*-\S*devel", text)
        index = re.search(r"TORCH_INDEX=https://download.pytorch.org/whl/cu(\d+)", text)
        assert base and index and index.group(1) == base.group(1) + base.group(2)
    else:
        assert "download.pytorch.org/whl/cpu" in torch
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and "runs" in ignored
    # The manifests' default image is the tag the README builds.
    assert "docker build -f docker/Dockerfile -t distlm:latest ." in (REPO / "README.md").read_text()
    assert compose(["cluster=k8s"])[0].cluster.k8s.image == "distlm:latest"


def test_ray_node_wrapper_relays_sigterm_and_stops_on_sigusr1(tmp_path):
    """The Ray node step's task: SIGTERM goes to the batch script (`scancel --batch`, here a
    stand-in on PATH) while the node keeps running; SIGUSR1 stops the node, exit code 0."""
    import signal
    import time

    calls = tmp_path / "scancel.calls"
    fake = tmp_path / "bin" / "scancel"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    node = tmp_path / "node.pid"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}
    cmd = [
        sys.executable,
        "-m",
        "distlm.launch.ray_nodes",
        "node",
        "--",
        "sh",
        "-c",
        f"echo $$ > {node}; exec sleep 300",
    ]
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 30
        while not node.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # relayed once
        time.sleep(1)
        assert proc.poll() is None
        os.kill(int(node.read_text()), 0)  # the node is still up
        assert calls.read_text().splitlines() == ["--batch --signal=TERM 42"]
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()


def test_ray_node_wrapper_names_a_command_it_cannot_start():
    result = subprocess.run(
        [sys.executable, "-m", "distlm.launch.ray_nodes", "node", "--", "no-such-ray", "start"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 127
    assert "cannot start the Ray node (no-such-ray start)" in result.stderr


def test_deepspeed_ops_are_built_at_install_time_not_on_the_first_run():
    """make install runs `distlm build-ops`: the ops DeepSpeed would compile on a first run here
    (minutes) are ready, so a run starts without compiling anything."""
    assert "$(BIN)/distlm build-ops" in (REPO / "Makefile").read_text()
    result = run_cli("build-ops", timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["deepspeed op cpu_adam: ready", "deepspeed op deepspeed_shm_comm: ready"]
