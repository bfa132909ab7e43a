"""Memory pre-flight: each rank's memory for a model, precision, ZeRO stage, offload, workers,
micro batch and sequence length, estimated on the driver before any worker starts.

Model states follow the ZeRO paper (Rajbhandari et al., 2020, section 3.1) for Adam: with Ψ
parameters of which Ψt train, N ranks and w bytes per training value (4 fp32, 2 bf16/fp16):

    parameters   w·Ψ           (/N at stage 3)
    gradients    w·Ψt          (/N at stages 2 and 3)
    optimizer    (4 + 8)·Ψt    fp32 master weights plus Adam's two moments (/N at stages 1-3)

Training in fp32, the weights are their own master copy, except that DeepSpeed's stages 1 and
2 still clone the partition each rank updates (its optimizer works on a flat fp32 copy), and
so does offloading (the master copy lives in host memory): the optimizer term is 8·Ψt at
stage 0 and 3, 12·Ψt/N at stages 1 and 2 or offloaded. ZeRO-Offload also keeps the fp32
gradient partition in host memory (4·Ψt/N more there). DeepSpeed's buffers: at stages 2 and 3
the gradient reduction bucket (zero.reduce_bucket_size values); at stage 3 the optimizer
step's fp32 copy of a sub-group's gradients and Adam's temporary of the same size
(zero.sub_group_size). Activations follow Korthikanti et al. (2022): per layer
s·b·h·(34 + 5·a·s/h) bytes in 16-bit (twice that in fp32), or only the layer inputs with
activation checkpointing, plus the fp32 logits and their gradient for the loss. Each worker
process also carries a fixed baseline (the libraries).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional

from distlm.config import ConfigError, ZeroConfig

GB = 1024**3
# A worker process before any model: torch, DeepSpeed, transformers, Ray's worker, allocator slack.
CPU_BASELINE = 1.2 * GB
GPU_BASELINE = 1.5 * GB  # CUDA context, cuBLAS/NCCL workspaces
# Memory the driver, Ray's own processes and the OS keep on a node that also runs workers.
NODE_RESERVE = 2.5 * GB


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model."""

    params: int  # all parameters (tied ones once)
    trainable: int  # parameters the optimizer updates
    layers: int
    hidden: int
    heads: int
    vocab: int
    largest_param: int  # the biggest single tensor: what ZeRO-3 gathers at once


@dataclass(frozen=True)
class Setting:
    stage: int
    world: int
    precision: str  # fp32 | bf16 | fp16
    micro_batch: int
    seq_len: int
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    reduce_bucket: int = ZeroConfig.reduce_bucket_size  # values in DeepSpeed's gradient reduction bucket
    sub_group: int = ZeroConfig.sub_group_size  # values in one of ZeRO-3's optimizer sub-groups
    live: int = ZeroConfig.live_parameters  # gathered values ZeRO-3 keeps (prefetched or for reuse)

    def describe(self) -> str:
        name = f"zero=zero{self.stage}"
        if self.stage == 3 and self.offload_params and self.offload_optimizer:
            name = "zero=zero3_offload"
        extra = [f"{self.world} workers", self.precision, f"micro batch {self.micro_batch}", f"seq {self.seq_len}"]
        if self.activation_checkpointing:
            extra.append("activation checkpointing")
        return f"{name} ({', '.join(extra)})"


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank. On GPUs `device` is what the GPU holds and `host` what offloading puts
    in host memory; on CPUs the two are the same memory (see `total_on`)."""

    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float  # DeepSpeed's gradient reduction bucket, ZeRO-3's optimizer sub-group copies
    baseline: float
    offloaded: float  # model states moved to host memory by offloading

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    def total_on(self, device: str) -> float:
        """What one worker needs of the memory that bounds it: GPU memory, or RAM on a CPU run."""
        device_total = self.model_states + self.activations + self.buffers + self.baseline
        return device_total + (self.offloaded if device == "cpu" else 0.0)


def model_states(shape: ModelShape, s: Setting) -> Dict[str, float]:
    """The ZeRO paper's per-rank model states (bytes) for this setting; see the module docstring."""
    w = 4 if s.precision == "fp32" else 2
    psi, psi_t, n = shape.params, shape.trainable, s.world
    params = w * psi / (n if s.stage == 3 else 1)
    grads = w * psi_t / (n if s.stage >= 2 else 1)
    master = 0 if s.precision == "fp32" and s.stage in (0, 3) and not s.offload_optimizer else 4
    optimizer = (master + 8) * psi_t / (n if s.stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optimizer}


def activations(shape: ModelShape, s: Setting) -> float:
    """Activation memory of one micro batch (bytes), Korthikanti et al. (2022) per layer, plus the
    fp32 logits and their gradient; ZeRO-3 also holds the parameters it gathered
    (zero.live_parameters; at least the largest whole, twice)."""
    w = 4 if s.precision == "fp32" else 2
    b, t, h, a = s.micro_batch, s.seq_len, shape.hidden, shape.heads
    per_layer = t * b * h * (34 + 5 * a * t / h) * w / 2
    if s.activation_checkpointing:
        layers = shape.layers * t * b * h * w + per_layer
    else:
        layers = shape.layers * per_layer
    logits = 2 * 4 * b * t * shape.vocab
    gathered = 0.0
    if s.stage == 3:  # the running module whole, with what is prefetched or kept for reuse
        gathered = w * min(max(2 * s.live, 2 * shape.largest_param), shape.params)
    return layers + logits + gathered


def estimate(shape: ModelShape, s: Setting, device: str = "cpu") -> Estimate:
    states = model_states(shape, s)
    offloaded = 0.0
    if s.offload_optimizer:
        offloaded += states["optimizer"] + (states["grads"] + 4 * shape.trainable / s.world if s.stage >= 2 else 0.0)
        states["optimizer"] = 0.0
        if s.stage >= 2:
            states["grads"] = 0.0
    if s.offload_params:
        offloaded += states["params"]
        states["params"] = 0.0
    baseline = GPU_BASELINE if device == "cuda" else CPU_BASELINE
    w = 4 if s.precision == "fp32" else 2
    buffers = w * s.reduce_bucket if s.stage >= 2 else 0.0
    if s.stage == 3 and not s.offload_optimizer:
        buffers += 2 * 4 * min(s.sub_group, shape.trainable / s.world)
    return Estimate(
        **states, activations=activations(shape, s), buffers=buffers, baseline=baseline, offloaded=offloaded
    )


def alternatives(shape: ModelShape, s: Setting, device: str, budget: float) -> List[tuple[Setting, Estimate]]:
    """Settings near `s` that fit `budget`, the least intrusive first: ZeRO-3, then activation
    checkpointing, a smaller micro batch, bf16 (GPU), offloading (GPU)."""
    candidates = []
    z3 = replace(s, stage=3) if s.stage < 3 else s
    candidates += [z3, replace(z3, activation_checkpointing=True)]
    micro = s.micro_batch // 2
    while micro >= 1:
        candidates.append(replace(z3, activation_checkpointing=True, micro_batch=micro))
        micro //= 2
    if device == "cuda":
        candidates += [
            replace(z3, precision="bf16", activation_checkpointing=True),
            replace(z3, precision="bf16", activation_checkpointing=True, offload_optimizer=True, offload_params=True),
        ]
    fits = []
    for c in dict.fromkeys(candidates):
        if c != s:
            e = estimate(shape, c, device)
            if e.total_on(device) <= budget:
                fits.append((c, e))
    return fits


def gb(x: float) -> str:
    return f"{x / GB:.1f} GB"


def check(shape: ModelShape, s: Setting, device: str, budget: Optional[float], where: str) -> Estimate:
    """The estimate; ConfigError naming the figure and a setting that fits when it will not."""
    e = estimate(shape, s, device)
    need = e.total_on(device)
    if budget is None or need <= budget:
        return e
    memory = "GPU memory" if device == "cuda" else "memory"
    message = (
        f"the model ({shape.params / 1e9:.2f}B parameters, {shape.trainable / 1e9:.2f}B trainable) needs "
        f"~{gb(need)} per worker with {s.describe()}, but a worker has ~{gb(budget)} of {memory} {where}"
    )
    fits = alternatives(shape, s, device, budget)
    if fits:
        better, be = fits[0]
        message += f"; {better.describe()} needs ~{gb(be.total_on(device))}: use that"
    else:
        message += "; no nearby setting fits: use more workers (cluster.num_workers, cluster.nodes) or a smaller model"
    raise ConfigError(message + " (distlm plan shows the estimate; trainer.memory_check=false skips this check)")


# What transformers' configs default to where a model preset leaves a size out (checked against
# the meta-device build for every preset in tests/test_memory.py).
_FORMULA_ARCHS = {
    # arch: (default feed-forward width as a multiple of hidden or None, q/k/v bias, tied embeddings)
    "llama": (None, False, False),
    "mistral": (None, False, False),
    "qwen2": (None, True, False),
    "gpt2": (4, True, True),
}
_FORMULA_EXTRA = {"num_key_value_heads", "tie_word_embeddings"}


def formula_shape(model_cfg, adapter_cfg, vocab_size: int, seq_len: int) -> Optional[ModelShape]:
    """The sizes of a randomly initialised Llama-family or GPT-2 model with no adapters, counted
    by formula. It saves importing transformers (seconds), so that a run that does not fit stops
    in seconds; None when the formula does not cover the config (the caller builds a skeleton)."""
    known = _FORMULA_ARCHS.get(model_cfg.arch)
    if known is None or adapter_cfg.name != "none" or model_cfg.pretrained or set(model_cfg.extra) - _FORMULA_EXTRA:
        return None
    ffn_multiple, qkv_bias, tied_default = known
    h, layers, heads = model_cfg.hidden_size, model_cfg.num_layers, model_cfg.num_heads
    ffn = model_cfg.intermediate_size or (ffn_multiple * h if ffn_multiple else None)
    if ffn is None:
        return None
    tied = model_cfg.extra.get("tie_word_embeddings", tied_default)
    if model_cfg.arch == "gpt2":
        # c_attn, c_proj, c_fc, mlp c_proj (all with biases), two LayerNorms; wpe; final LayerNorm.
        layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h
        extra = seq_len * h + 2 * h
    else:
        kv = model_cfg.extra.get("num_key_value_heads", heads) * (h // heads)
        # q, k, v, o projections; gate, up, down; two RMSNorms; final RMSNorm.
        layer = h * h + 2 * h * kv + h * h + (h + 2 * kv if qkv_bias else 0) + 3 * h * ffn + 2 * h
        extra = h
    embeddings = vocab_size * h * (1 if tied else 2)
    params = embeddings + layers * layer + extra
    return ModelShape(
        params=params,
        trainable=params,
        layers=layers,
        hidden=h,
        heads=heads,
        vocab=vocab_size,
        largest_param=max(vocab_size * h, h * ffn, h * 3 * h if model_cfg.arch == "gpt2" else h * h),
    )


def model_shape(
    model_cfg, adapter_cfg, tasks: List[str], vocab_size: int, seq_len: int, eos_id: int, source: Optional[str]
) -> ModelShape:
    """The model's sizes: by formula where it covers the model, else from a weightless skeleton
    (meta device) with adapters applied."""
    if source is None:
        counted = formula_shape(model_cfg, adapter_cfg, vocab_size, seq_len)
        if counted is not None:
            return counted
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from distlm.adapters import apply_adapters
    from distlm.models import build_config

    hf = AutoConfig.from_pretrained(source) if source else build_config(model_cfg, vocab_size, seq_len, eos_id)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf)
        largest = max(p.numel() for p in skeleton.parameters())
        try:
            model = apply_adapters(skeleton, adapter_cfg, tasks)
        except ValueError as e:  # e.g. adapter.modules_to_save naming no module of this model
            raise ConfigError(str(e)) from None
    text = hf.get_text_config()
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        heads=text.num_attention_heads,
        vocab=text.vocab_size,
        largest_param=largest,
    )


def host_memory() -> int:
    """This machine's RAM, or the cgroup's limit when smaller (containers, Slurm jobs)."""
    import os

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def worker_budget(cluster, device: str, joined: bool) -> tuple[Optional[float], str]:
    """(bytes one worker may use, where that figure comes from); None when it cannot be known here."""
    if cluster.memory_per_worker_gb is not None:
        return cluster.memory_per_worker_gb * GB, "(cluster.memory_per_worker_gb)"
    if device == "cuda":
        import torch

        if joined or not torch.cuda.is_available():
            return None, "unknown"
        free, _ = torch.cuda.mem_get_info()
        return float(free), f"(GPU 0 of this machine, {gb(free)} free)"
    if not joined:
        total = host_memory()
        return (total - NODE_RESERVE) / cluster.num_workers, (
            f"here ({gb(total)} RAM, {cluster.num_workers} workers, ~{gb(NODE_RESERVE)} kept for the driver and Ray)"
        )
    import ray

    per_worker = []
    for node in ray.nodes():
        resources = node.get("Resources", {}) if node.get("Alive") else {}
        workers = int(resources.get("CPU", 0) // max(cluster.cpus_per_worker, 1))
        if workers and resources.get("memory"):
            per_worker.append(resources["memory"] / workers)
    if not per_worker:
        return None, "unknown"
    return min(per_worker), "(Ray's memory of the smallest node / the workers it fits)"


def setting_of(cfg, precision: str) -> Setting:
    z = cfg.zero
    return Setting(
        stage=z.stage,
        world=cfg.cluster.num_workers,
        precision=precision,
        micro_batch=cfg.trainer.micro_batch_size,
        seq_len=cfg.data.seq_len,
        offload_optimizer=z.offload_optimizer,
        offload_params=z.offload_params,
        activation_checkpointing=cfg.model.activation_checkpointing,
        reduce_bucket=z.reduce_bucket_size,
        sub_group=z.sub_group_size,
        live=z.live_parameters,
    )


@dataclass
class Plan:
    shape: ModelShape
    setting: Setting
    device: str
    budget: Optional[float]
    where: str

    @property
    def estimate(self) -> Estimate:
        return estimate(self.shape, self.setting, self.device)

    def check(self) -> Estimate:
        return check(self.shape, self.setting, self.device, self.budget, self.where)

    def summary(self) -> str:
        e = self.estimate
        budget = (
            f" of ~{gb(self.budget)} {self.where}" if self.budget is not None else " (a worker's memory is unknown)"
        )
        return (
            f"memory: ~{gb(e.total_on(self.device))} per worker{budget}: model states {gb(e.model_states)}, "
            f"activations {gb(e.activations)}, buffers {gb(e.buffers)}, baseline {gb(e.baseline)}"
            + (f", offloaded {gb(e.offloaded)}" if e.offloaded else "")
        )

    def table(self) -> List[Dict[str, str]]:
        """The estimate for every ZeRO preset next to the chosen setting (distlm plan)."""
        rows = []
        presets = [("zero0", 0, False), ("zero1", 1, False), ("zero2", 2, False), ("zero3", 3, False)]
        presets.append(("zero3_offload", 3, True))
        for name, stage, offload in presets:
            s = replace(self.setting, stage=stage, offload_optimizer=offload, offload_params=offload)
            e = estimate(self.shape, s, self.device)
            total = e.total_on(self.device)
            fits = "?" if self.budget is None else ("yes" if total <= self.budget else "no")
            chosen = s == self.setting
            rows.append(
                {
                    "zero": name + (" (chosen)" if chosen else ""),
                    "params": gb(e.params),
                    "grads": gb(e.grads),
                    "optimizer": gb(e.optimizer),
                    "activations": gb(e.activations),
                    "buffers": gb(e.buffers),
                    "offloaded": gb(e.offloaded),
                    "per worker": gb(total),
                    "fits": fits,
                }
            )
        return rows


def plan(cfg, device: str, precision: str, joined: bool) -> Plan:
    """The estimate for a composed run (pretrained paths already Hugging Face directories). A model
    made from scratch takes its vocabulary from data.tokenizer, or the size of the BPE to train."""
    source = cfg.init_from or cfg.model.pretrained
    vocab_size = cfg.data.vocab_size
    if source is None and cfg.data.tokenizer is not None:
        from distlm.data.tokenizer import load_tokenizer

        vocab_size = len(load_tokenizer(cfg.data.tokenizer))
    shape = model_shape(cfg.model, cfg.adapter, list(cfg.task.tasks), vocab_size, cfg.data.seq_len, 0, source)
    budget, where = worker_budget(cfg.cluster, device, joined)
    return Plan(shape, setting_of(cfg, precision), device, budget, where)
