"""Shared by the serving tests: tiny exports with LoRA adapters, the plain transformers/peft
reference they are checked against, and HTTP clients."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import httpx
import torch

from distlm.runtime import free_port  # noqa: F401 (the tests import it from here)
from helpers import compose_cfg

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CONTEXT = 64
PROMPTS = ["def main(argv):\n", "import os\nimport sys\n", "class Parser(object):", "x = [i for i in"]


def build_export(root: Path) -> Path:
    """<root>/export: a random-init GPT-2 + the project tokenizer + LoRA adapters alpha and beta
    (random, different seeds, so each changes the output); beta also has its own copies of the
    embeddings, head and final norm (modules_to_save)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from distlm.data import prepare_data

    cfg = compose_cfg([], root)
    data = prepare_data(cfg.data, seed=cfg.trainer.seed, progress=False)
    export = root / "export"
    torch.manual_seed(0)
    eos = data.eos_token_id
    config = GPT2Config(
        vocab_size=data.vocab_size,
        n_positions=CONTEXT,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,  # a peaked random model: greedy answers vary with the prompt
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(export)
    AutoTokenizer.from_pretrained(data.tokenizer_dir).save_pretrained(export)
    for seed, (task, copies) in enumerate([("alpha", None), ("beta", ["wte", "lm_head", "ln_f"])]):
        torch.manual_seed(100 + seed)
        lora = LoraConfig(
            r=8, lora_alpha=32, target_modules=["c_attn", "c_proj"], modules_to_save=copies, init_lora_weights=False
        )
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(export), lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".modules_to_save." in name:
                    param.add_(0.2 * torch.randn_like(param))
        model.save_pretrained(export / "adapters" / task)
    return root


def smollm2_export(root: Path, source: Path) -> Path:
    """<root>/export: SmolLM2-135M-Instruct (linked from `source`, its Hugging Face directory)
    with two plain LoRA adapters alpha and beta (random, different seeds)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    export = root / "export"
    export.mkdir(parents=True)
    for f in Path(source).iterdir():
        if f.is_file():
            (export / f.name).symlink_to(f.resolve())
    for seed, task in enumerate(["alpha", "beta"]):
        torch.manual_seed(100 + seed)
        lora = LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False
        )
        get_peft_model(AutoModelForCausalLM.from_pretrained(export), lora).save_pretrained(export / "adapters" / task)
    return root


# The agent_export router's designed choice for each of PROMPTS.
AGENT_ROUTES = ("alpha", "beta", "intent", "alpha")


def agent_export(root: Path, source: Path) -> Path:
    """smollm2_export plus what makes it an agent: an `intent` LoRA with a random classification
    head (labels no/yes) over it, and a router (reading 8 of the 30 layers, adapters off) fitted
    so that each of PROMPTS goes to its AGENT_ROUTES task with a wide margin."""
    import json

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from distlm.heads import head_config, pooled_hidden
    from distlm.serve.engines import ModelText

    smollm2_export(root, source)
    export = root / "export"
    torch.manual_seed(102)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(export), lora).save_pretrained(export / "adapters" / "intent")
    base = AutoModelForCausalLM.from_pretrained(export).eval()
    text = ModelText(str(export))
    with torch.no_grad():
        features = torch.cat(
            [
                pooled_hidden(base, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), 8)
                for ids in (text.encode(p) for p in PROMPTS)
            ]
        ).double()
    labels = ["alpha", "beta", "intent"]
    targets = torch.full((len(PROMPTS), len(labels)), -5.0, dtype=torch.float64)
    for row, task in enumerate(AGENT_ROUTES):
        targets[row, labels.index(task)] = 5.0
    weight = (torch.linalg.pinv(features) @ targets).T.float().contiguous()
    heads = {
        "router": (weight, torch.zeros(len(labels)), labels, None, 8),
        "heads/intent": (0.05 * torch.randn(2, weight.shape[1]), torch.zeros(2), ["no", "yes"], "intent", None),
    }
    for where, (w, b, names, adapter, layers) in heads.items():
        (export / where).mkdir(parents=True)
        save_file({"weight": w, "bias": b}, str(export / where / "head.safetensors"))
        config = head_config(where.split("/")[-1], names, adapter, 1.0, layers) | {"in_features": w.shape[1]}
        (export / where / "head_config.json").write_text(json.dumps(config))
    return root


class Reference:
    """The export loaded by plain transformers, each adapter loaded by peft itself."""

    def __init__(self, export: Path, adapters: Sequence[str] = ("alpha", "beta")) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from distlm.serve.engines import ModelText

        self.tokenizer = AutoTokenizer.from_pretrained(export)
        # Only for how a token is named in log-probabilities (a convention, not a number).
        self.text = ModelText(str(export))
        self.models = {None: AutoModelForCausalLM.from_pretrained(export).eval()}
        self._answers: Dict[Tuple, Tuple[List[int], str]] = {}
        for task in adapters:
            base = AutoModelForCausalLM.from_pretrained(export)
            self.models[task] = PeftModel.from_pretrained(base, export / "adapters" / task).eval()

    def ids(self, prompt: Union[str, List[int]]) -> List[int]:
        return self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)

    def __call__(self, prompt: Union[str, List[int]], adapter: Optional[str], max_tokens: int) -> Tuple[List[int], str]:
        """Greedy `generate`: (new token ids, their text); remembered, as tests ask again."""
        key = (tuple(self.ids(prompt)), adapter, max_tokens)
        if key not in self._answers:
            self._answers[key] = self._generate(prompt, adapter, max_tokens)
        return self._answers[key]

    def _generate(
        self, prompt: Union[str, List[int]], adapter: Optional[str], max_tokens: int
    ) -> Tuple[List[int], str]:
        ids = torch.tensor([self.ids(prompt)])
        with torch.no_grad():
            out = self.models[adapter].generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
            )
        new = out[0, ids.shape[1] :].tolist()
        return new, self.tokenizer.decode(new, skip_special_tokens=True)

    def eos_prompt(self) -> List[int]:
        """A token-id prompt after which the base model's greedy next token is EOS (the model is
        fixed by its seed; searched over one-token prompts, then two-token ones)."""
        model, eos = self.models[None], self.tokenizer.eos_token_id
        vocab = torch.arange(model.config.vocab_size)
        with torch.no_grad():
            for first in [None, *vocab.tolist()]:
                ids = vocab[:, None] if first is None else torch.stack([torch.full_like(vocab, first), vocab], 1)
                hits = (model(input_ids=ids).logits[:, -1].argmax(-1) == eos).nonzero()
                if len(hits):
                    return ids[int(hits[0])].tolist()
        raise AssertionError("the model never predicts EOS after one or two tokens")

    def logprobs(self, ids: List[int], adapter: Optional[str]) -> torch.Tensor:
        """log_softmax of the logits at each position of `ids` (row i predicts token i + 1)."""
        with torch.no_grad():
            logits = self.models[adapter](input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)


def openai_client(url: str):
    import openai

    http = httpx.Client(trust_env=False, timeout=300)
    return openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, http_client=http, max_retries=0)


def model_id(name: str, adapter: Optional[str]) -> str:
    return name if adapter is None else f"{name}:{adapter}"


def mc_questions() -> List[Tuple[str, List[str], int]]:
    """Multiple-choice questions (context, choices, index of the right one): deterministic arithmetic."""
    questions = []
    for a, b in [(2, 3), (4, 1), (7, 2), (5, 5), (9, 3), (6, 7)]:
        right = a + b
        choices = [f" {right}", f" {right + 1}", f" {right * 2}", f" {abs(a - b)}"]
        questions.append((f"{a} + {b} =", choices, 0))
    return questions


def mc_harness(score, questions) -> Tuple[float, List[List[float]]]:
    """Accuracy of picking the choice with the highest log-likelihood; `score(context, continuation)`
    returns the continuation's summed log-probability (the lm-eval-harness 'loglikelihood')."""
    scores = [[score(context, choice) for choice in choices] for context, choices, _ in questions]
    right = sum(max(range(len(s)), key=s.__getitem__) == answer for s, (_, _, answer) in zip(scores, questions))
    return right / len(questions), scores


def api_scorer(client, model: str):
    """Scores through the OpenAI completions API: echo the context + continuation with logprobs,
    generate nothing, and sum the log-probabilities of the tokens from the continuation on."""

    def score(context: str, continuation: str) -> float:
        out = client.completions.create(model=model, prompt=context + continuation, max_tokens=0, echo=True, logprobs=0)
        lp = out.choices[0].logprobs
        return sum(v for v, o in zip(lp.token_logprobs, lp.text_offset) if o >= len(context) and v is not None)

    return score


def direct_scorer(reference: Reference, adapter: Optional[str]):
    """The same harness on the export loaded directly by transformers."""

    def score(context: str, continuation: str) -> float:
        ctx = reference.tokenizer(context).input_ids
        ids = reference.tokenizer(context + continuation).input_ids
        assert ids[: len(ctx)] == ctx, "the continuation must start a new token"
        logp = reference.logprobs(ids, adapter)
        return sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids)))

    return score


def assert_logprobs_match(reference: Reference, adapter, prompt_ids: List[int], logprobs, echo: bool, k: int) -> None:
    """A completion's legacy logprobs object equals log_softmax of plain transformers, to 1e-4."""
    generated = len(logprobs.token_logprobs) - (len(prompt_ids) if echo else 0)
    assert generated >= 0
    # The ids: the prompt's, then the generated ones recovered from the reference's greedy run.
    new_ids, _ = reference(prompt_ids, adapter, generated) if generated else ([], "")
    ids = list(prompt_ids) + new_ids
    logp = reference.logprobs(ids, adapter)
    start = 0 if echo else len(prompt_ids)
    for j, (value, top) in enumerate(zip(logprobs.token_logprobs, logprobs.top_logprobs)):
        i = start + j
        if i == 0:
            assert value is None and top is None
            continue
        assert abs(value - float(logp[i - 1, ids[i]])) < 1e-4, (j, value, float(logp[i - 1, ids[i]]))
        want = logp[i - 1].topk(k)
        strings = [reference.text.token_string(t) for t in want.indices.tolist()]
        for s, v in zip(strings, want.values.tolist()):
            assert abs(top[s] - v) < 1e-4, (j, s, top, v)
