"""`distlm launch k8s`: KubeRay manifests (apiVersion ray.io/v1) for a run, and `kubectl apply`.

- RayJob: a Ray cluster (a head pod for the driver, cluster.nodes worker pods of
  cluster.cpus_per_node CPUs / cluster.gpus_per_node GPUs) whose entry point is
  `distlm train <the run's overrides>`; KubeRay deletes the cluster when the job ends.
- RayService: `distlm.serve.app:build_app` on the run's export, for serving it afterwards.

Every pod mounts the PVC cluster.k8s.pvc at cluster.k8s.mount_path; the run dir and the
data cache are on it (output_root=<mount_path>/runs), so a resubmitted job resumes.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional

from distlm.config import ClusterConfig, Config, ConfigError, K8sConfig
from distlm.launch import Point, check_cluster, log, set_override
from distlm.launch import plan as plan_points

API_VERSION = "ray.io/v1"
SERVE_IMPORT_PATH = "distlm.serve.app:build_app"
RUNS_VOLUME, SHM_VOLUME = "distlm-runs", "dshm"
# Ray's head ports (KubeRay wires its head Service to these names).
HEAD_PORTS = [("gcs-server", 6379), ("dashboard", 8265), ("client", 10001), ("serve", 8000)]


def plan(overrides: List[str], multirun: bool) -> List[Point]:
    """As for Slurm, with the outputs on the shared volume unless the user put them elsewhere."""
    extra = (
        []
        if any(o.lstrip("+").startswith("output_root=") for o in overrides)
        else ["output_root=${cluster.k8s.mount_path}/runs"]
    )
    points = plan_points("k8s", overrides, multirun, extra)
    for p in points:
        check_k8s(p.cfg.cluster)
        if extra:  # the resolved path, not the interpolation
            p.train_args = set_override(p.train_args, "output_root", p.cfg.output_root)
    return points


def check_k8s(c: ClusterConfig) -> None:
    check_cluster(c)
    k = c.k8s
    if not k.image:
        raise ConfigError("cluster.k8s.image is empty: give the image built from docker/Dockerfile (README)")
    if not k.mount_path.startswith("/"):
        raise ConfigError(f"cluster.k8s.mount_path={k.mount_path!r} must be an absolute path (e.g. /mnt/distlm)")
    for key, value in [("serve_nodes", k.serve_nodes), ("backoff_limit", k.backoff_limit), ("head_cpus", k.head_cpus)]:
        if value < 0:
            raise ConfigError(f"cluster.k8s.{key}={value} must not be negative")
    for i, t in enumerate(k.tolerations):
        if not isinstance(t, dict) or ("key" not in t and t.get("operator") != "Exists"):
            raise ConfigError(
                f"cluster.k8s.tolerations[{i}]={t!r} is not a toleration: e.g. {{key: nvidia.com/gpu, operator: Exists}}"
            )


def k8s_name(run_name: str, prefix: str = "distlm") -> str:
    """A DNS-1123 name; KubeRay adds suffixes to its clusters, so it stays short."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{prefix}-{run_name}".lower()).strip("-")
    return name[:40].rstrip("-")


def _pod(k: K8sConfig, container: str, cpus: int, memory: str, gpus: int) -> Dict[str, Any]:
    resources: Dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    spec: Dict[str, Any] = {
        "containers": [
            {
                "name": container,
                "image": k.image,
                "imagePullPolicy": k.image_pull_policy,
                "resources": {"requests": dict(resources), "limits": dict(resources)},
                "volumeMounts": [
                    {"name": RUNS_VOLUME, "mountPath": k.mount_path},
                    # Ray's object store lives in shared memory; the default 64 MiB is too small.
                    {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
                    *k.volume_mounts,
                ],
            }
        ],
        "volumes": [
            {"name": RUNS_VOLUME, "persistentVolumeClaim": {"claimName": k.pvc}},
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
            *k.volumes,
        ],
    }
    if container == "ray-head":
        spec["containers"][0]["ports"] = [{"name": name, "containerPort": port} for name, port in HEAD_PORTS]
    if k.env:
        spec["containers"][0]["env"] = list(k.env)
    if k.node_selector:
        spec["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        spec["tolerations"] = list(k.tolerations)
    return {"spec": spec}


def ray_cluster_spec(c: ClusterConfig, workers: int, group: str) -> Dict[str, Any]:
    """Head (no training workers: num-cpus 0) and one group of `workers` identical worker pods."""
    k = c.k8s
    return {
        "rayVersion": version("ray"),
        "headGroupSpec": {
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": _pod(k, "ray-head", k.head_cpus, k.head_memory, 0),
        },
        "workerGroupSpecs": [
            {
                "groupName": group,
                "replicas": workers,
                "minReplicas": workers,
                "maxReplicas": workers,
                "rayStartParams": {},
                "template": _pod(k, "ray-worker", c.cpus_per_node, k.memory, c.gpus_per_node),
            }
        ],
    }


def _metadata(name: str, cfg: Config) -> Dict[str, Any]:
    run = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(cfg.run_dir).name)[:63].strip("-_.")
    return {
        "name": name,
        "namespace": cfg.cluster.k8s.namespace,
        "labels": {"app.kubernetes.io/name": "distlm", "distlm/run": run},
    }


def rayjob(cfg: Config, entrypoint: str) -> Dict[str, Any]:
    c = cfg.cluster
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(k8s_name(Path(cfg.run_dir).name), cfg),
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "backoffLimit": c.k8s.backoff_limit,
            "ttlSecondsAfterFinished": c.k8s.ttl_seconds_after_finished,
            "rayClusterSpec": ray_cluster_spec(c, c.nodes, "workers"),
        },
    }


def serve_args(cfg: Config) -> Dict[str, Any]:
    """build_app's arguments: the run dir on the volume plus the serve group's settings.
    HTTP host/port belong to Serve's http_options; the API key comes from the pod's env."""
    skip = {"host", "port", "app_name", "route_prefix", "api_key"}
    args = {"path": cfg.run_dir}
    for f in dataclasses.fields(cfg.serve):
        value = getattr(cfg.serve, f.name)
        if f.name not in skip and value is not None:
            args[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value  # serve.agent
    return args


def rayservice(cfg: Config) -> Dict[str, Any]:
    import yaml

    c, s = cfg.cluster, cfg.serve
    serve_config = {
        "http_options": {"host": "0.0.0.0", "port": s.port},
        "applications": [
            {
                "name": s.app_name,
                "route_prefix": s.route_prefix,
                "import_path": SERVE_IMPORT_PATH,
                "args": serve_args(cfg),
            }
        ],
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(k8s_name(Path(cfg.run_dir).name, "distlm-serve"), cfg),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": ray_cluster_spec(c, c.k8s.serve_nodes, "serve"),
        },
    }


def manifests(point: Point) -> Dict[str, Dict[str, Any]]:
    import shlex

    entrypoint = shlex.join(["distlm", "train", *point.train_args])
    return {"rayjob": rayjob(point.cfg, entrypoint), "rayservice": rayservice(point.cfg)}


def to_yaml(doc: Dict[str, Any]) -> str:
    import yaml

    # Multi-line strings (serveConfigV2) as YAML block scalars, as people write them.
    class Dumper(yaml.SafeDumper):
        pass

    def string(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, string)
    Dumper.ignore_aliases = lambda self, data: True  # no &anchors for the lists head and workers share
    return yaml.dump(doc, Dumper=Dumper, sort_keys=False)


def kubectl_apply(path: Path) -> int:
    if shutil.which("kubectl") is None:
        log("error: kubectl is not on PATH: install it, or use --dry-run and apply the files yourself")
        return 1
    result = subprocess.run(["kubectl", "apply", "-f", str(path)], text=True, capture_output=True, timeout=300)
    print(result.stdout, end="")
    if result.returncode != 0:
        log(f"error: kubectl apply -f {path} failed ({result.returncode}): {result.stderr.strip()}")
    return result.returncode


def launch(points: List[Point], dry_run: bool, apply: bool, serve: bool, out: Optional[str]) -> int:
    for i, point in enumerate(points):
        docs = manifests(point)
        run_name = Path(point.cfg.run_dir).name
        directory = Path(out) if out else None
        if directory is None and not dry_run:
            directory = Path("runs") / "k8s" / run_name
        if len(points) > 1 and out:
            directory = Path(out) / run_name
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for kind, doc in docs.items():
                (directory / f"{kind}.yaml").write_text(to_yaml(doc))
            log(f"wrote {directory / 'rayjob.yaml'} and {directory / 'rayservice.yaml'}")
        if dry_run or not apply:
            print("---\n" * (i > 0) + "---\n".join(to_yaml(doc) for doc in docs.values()), end="")
            if not dry_run:
                log("nothing applied: add --apply to run kubectl apply")
            continue
        kind = "rayservice" if serve else "rayjob"
        code = kubectl_apply(directory / f"{kind}.yaml")
        if code != 0:
            return code
    return 0
