"""LoRA fine-tuning of the served model on the team's samples (peft on torch): the flywheel's
training step. What it writes, llama.cpp serves once quantized (server/training/quantize.py).

The out directory holds:
    checkpoint/   adapter weights, optimizer state, step, data position and RNG state: a second
                  run with the same out directory goes on from here (a step in progress is lost)
    adapter/      the adapter as peft saves it
    merged/       the base with the adapter merged in, in the base's dtype, with its tokenizer
    tune.json     what was trained on, how, how fast, and the held-out losses
The defaults are the recipe that lifted Qwen2.5-Coder-0.5B on held-out code of three projects
(benchmarks/RESULTS.md, `mix-8`): rank 64 on every linear projection of attention and MLP (LoRA
on attention alone falls short of full fine-tuning, QLoRA, Dettmers et al. 2023; a higher rank
closes part of the gap in continued pretraining on code, Biderman et al. 2024), alpha twice the
rank (at any rank), lr 5e-4 falling to zero at the run's bound, 4k tokens a step (about 50 s on
two EPYC cores in bf16).
The learning rate warms up over WARMUP_STEPS; with `lr_decay` (the default) it then falls
linearly to zero at the run's bound (`learning_rate`), so a run cut by a budget ends on its
smallest steps rather than mid-stride at the peak (Li et al., "Budgeted Training", ICLR 2020);
without, it stays at the peak. The fall depends on the bound: a run resumed with a larger one
follows another schedule.

The loss is on the target, and at PROMPT_WEIGHT on the prompt's own code, the file's text before
the cursor (dataset.Sample.code): a completion's target is a few tokens, its prompt hundreds
of tokens of the team's code, and learning that code is most of what a short run on a CPU can
learn. The context chunks and the template's text are not learned: they are not code as written.

Given held-out samples (files the training set lacks), the same loss is measured on them before
the first step, every HELDOUT_EVERY steps and after the last, with dropout off; the adapter
written is the one of the lowest held-out loss, so a run that learns its training files by heart
and generalizes worse keeps its earlier, better step (early stopping). The base's own loss, at
step 0, tells whether the run learned anything that carries to code it has not seen.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ghostpen.server.errors import TrainingError
from ghostpen.server.model_store import resolve
from ghostpen.server.training.dataset import Dataset, Sample, plan_step, read_dataset

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

RANK = 64
ALPHA_PER_RANK = 2  # alpha twice the rank, whatever the rank: the update's scale stays 2
DROPOUT = 0.05
LEARNING_RATE = 5e-4
WARMUP_STEPS = 3  # the learning rate rises linearly over these, then stays (or decays)
MAX_GRAD_NORM = 1.0
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_SEQ_TOKENS = 2048  # a sample's prompt and target; the serving context window's default
BATCH_TOKENS = 4096  # tokens (prompt and target) an optimizer step reads, over micro-batches
PROMPT_WEIGHT = 1.0  # the loss's weight on the prompt's own code, against 1 on the target
LOGIT_CHUNK = 512  # positions projected to the vocabulary at once; recomputed in the backward
STEPS = 100
CHECKPOINT_EVERY_S = 600.0
HELDOUT_EVERY = 16  # steps between held-out losses: each costs a forward over the held-out set
DTYPES = ("auto", "bf16", "fp32")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo: bf16 matmuls in hardware


@dataclass(frozen=True)
class TuneConfig:
    data: Path
    out: Path
    base: str  # a registry name (its `ghostpen models convert` checkpoint) or a Hugging Face dir
    cache_dir: Path
    steps: int | None = STEPS  # in all, across resumed runs; None: until `minutes`
    minutes: float | None = None  # of this run; the step in progress finishes
    rank: int = RANK
    alpha: int | None = None  # None: ALPHA_PER_RANK times the rank
    dropout: float = DROPOUT
    lr: float = LEARNING_RATE
    prompt_weight: float = PROMPT_WEIGHT
    lr_decay: bool = True  # to zero at the first bound, steps or minutes
    target_modules: tuple[str, ...] = TARGET_MODULES
    # LoRA on the top N decoder layers only (0: all): the backward stops below them, so a step
    # costs less than a forward and a full backward, at the price of what lower layers learn
    top_layers: int = 0
    max_seq_tokens: int = MAX_SEQ_TOKENS
    batch_tokens: int = BATCH_TOKENS
    seed: int = 0
    dtype: str = "auto"  # auto: bf16 on a GPU or a CPU with bf16 in hardware, else fp32
    device: str = "auto"  # auto: cuda where there is one, else cpu
    checkpoint_every_s: float = CHECKPOINT_EVERY_S
    heldout: Path | None = None  # samples as `data`, from files it lacks: the adapter kept is
    heldout_every: int = HELDOUT_EVERY  # the one of the lowest loss on them

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError("a fine-tune needs a bound: steps, minutes, or both")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}: {self.dtype!r}")
        if self.heldout_every < 1:
            raise ValueError(f"heldout_every must be at least 1: {self.heldout_every}")
        check_recipe(self.rank, self.batch_tokens, self.top_layers, self.prompt_weight)

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else ALPHA_PER_RANK * self.rank


def check_recipe(rank: int, batch_tokens: int, top_layers: int, prompt_weight: float) -> None:
    """The knobs a tune refuses; the loop checks them too, before its export."""
    if prompt_weight < 0:
        raise ValueError(f"prompt_weight must be at least 0: {prompt_weight}")
    if top_layers < 0:
        raise ValueError(f"top_layers must be at least 0 (0: all): {top_layers}")
    if batch_tokens < 1 or rank < 1:
        raise ValueError(f"batch_tokens and rank must be at least 1: {batch_tokens}, {rank}")


@dataclass(frozen=True)
class Progress:
    step: int  # 0: before the first, when the base's held-out loss is measured
    loss: float  # the step's weighted mean over its learned tokens; nan at step 0
    tokens_per_s: float  # tokens read (prompt and target) per second of this run's steps
    elapsed_s: float  # of this run
    heldout_loss: float | None = None  # where measured after this step

    def describe(self) -> str:
        heldout = "" if self.heldout_loss is None else f", held-out loss {self.heldout_loss:.3f}"
        if self.step == 0:
            return f"before training{heldout}"
        return (
            f"step {self.step}: loss {self.loss:.3f}{heldout}, {self.tokens_per_s:,.0f} tokens/s, "
            f"{self.elapsed_s:,.0f} s"
        )


@dataclass(frozen=True)
class TuneResult:
    base_dir: Path  # the Hugging Face checkpoint tuned, the adapter's base
    adapter_dir: Path
    merged_dir: Path
    summary: Path  # tune.json
    steps: int
    resumed_from: int  # the step a checkpoint held when this run began; 0 for a fresh one
    tokens: int  # read in all runs
    seconds: float  # training time of all runs
    loss: float  # of the last step
    samples: int
    dropped: int
    cut: int
    kept_step: int  # whose adapter was written: the last, or the lowest held-out loss's
    heldout: tuple[tuple[int, float], ...]  # (step, held-out loss), step 0 the base's


@dataclass
class _State:
    """What a checkpoint holds besides the weights and the optimizer."""

    step: int = 0
    position: int = 0  # samples dealt so far (dataset.plan_step)
    tokens: int = 0
    target_tokens: int = 0
    seconds: float = 0.0
    loss: float = math.nan
    heldout: list[list[float]] = field(default_factory=list)  # [step, held-out loss]


def tune(config: TuneConfig, progress: Callable[[Progress], None] | None = None) -> TuneResult:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    base = resolve(config.base, config.cache_dir, want="hf").path
    device = config.device if config.device != "auto" else _auto_device()
    dtype = _dtype(config.dtype, device)
    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset = read_dataset(config.data, tokenizer, config.max_seq_tokens)
    heldout = (
        read_dataset(config.heldout, tokenizer, config.max_seq_tokens) if config.heldout else None
    )
    run = _run_identity(config, base, dataset, heldout, dtype)
    base_config = AutoConfig.from_pretrained(base)
    saved_dtype = base_config.dtype or torch.float32
    layers = base_config.num_hidden_layers
    if config.top_layers > layers:
        raise TrainingError(f"top_layers is {config.top_layers}; the model has {layers} layers")

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=list(range(layers - config.top_layers, layers))
        if config.top_layers
        else None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)  # on the adapter
    checkpoint = config.out / "checkpoint"
    state = _resume(checkpoint, run, model, optimizer) if checkpoint.is_dir() else _State()
    resumed_from = state.step
    say = progress or _print_progress
    started = time.monotonic()
    best = _Best.resumed(checkpoint, state)

    def measure_heldout() -> float | None:
        """The held-out loss after the step just done, where one is due; the adapter kept."""
        if heldout is None or any(step == state.step for step, _ in state.heldout):
            return None
        loss = heldout_loss(model, heldout, config.prompt_weight, device, config.max_seq_tokens)
        state.heldout.append([state.step, loss])
        best.consider(model, state.step, loss)
        return loss

    if state.step == 0 and (loss := measure_heldout()) is not None:
        say(Progress(0, math.nan, 0.0, time.monotonic() - started, loss))
    model.train()
    deadline = started + config.minutes * 60 if config.minutes is not None else math.inf
    last_saved = started
    run_tokens, run_seconds = 0, 0.0  # of this run's steps, not its held-out losses
    while (config.steps is None or state.step < config.steps) and time.monotonic() < deadline:
        micro_batches, position = plan_step(
            dataset, config.seed, state.position, config.batch_tokens, config.max_seq_tokens
        )
        step_started = time.monotonic()
        batches = [[dataset.samples[i] for i in batch] for batch in micro_batches]
        lr = learning_rate(config, state.step, time.monotonic() - started)
        loss = _step(model, optimizer, batches, lr, config.prompt_weight, device)
        tokens = sum(len(sample.ids) for batch in batches for sample in batch)
        run_tokens += tokens
        state.step, state.position, state.loss = state.step + 1, position, loss
        state.tokens += tokens
        state.target_tokens += sum(sample.target_tokens for batch in batches for sample in batch)
        spent = time.monotonic() - step_started
        run_seconds, state.seconds = run_seconds + spent, state.seconds + spent
        last = config.steps is not None and state.step == config.steps
        due = last or state.step % config.heldout_every == 0 or time.monotonic() >= deadline
        measured = measure_heldout() if due else None
        elapsed = time.monotonic() - started
        say(Progress(state.step, loss, run_tokens / run_seconds, elapsed, measured))
        if time.monotonic() - last_saved >= config.checkpoint_every_s:
            _save_checkpoint(checkpoint, run, model, optimizer, state, best)
            last_saved = time.monotonic()
    if (loss := measure_heldout()) is not None:  # a run resumed with nothing left to train
        say(Progress(state.step, state.loss, 0.0, time.monotonic() - started, loss))
    _save_checkpoint(checkpoint, run, model, optimizer, state, best)
    kept_step = best.restore(model) if heldout is not None else state.step

    adapter_dir = _replace_dir(config.out / "adapter", model.save_pretrained)
    merged = model.merge_and_unload().to(saved_dtype)

    def save_merged(directory: Path) -> None:
        merged.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    merged_dir = _replace_dir(config.out / "merged", save_merged)
    summary = config.out / "tune.json"
    _write_json(
        summary,
        {
            **run,
            "data": str(config.data),
            "device": device,
            "steps": state.step,
            "tokens": state.tokens,
            "target_tokens": state.target_tokens,
            "seconds": round(state.seconds, 3),
            "tokens_per_s": round(state.tokens / state.seconds, 1) if state.seconds else 0.0,
            "loss": state.loss if state.step else None,
            "samples": len(dataset.samples),
            "dropped": dataset.dropped,
            "cut": dataset.cut,
            "heldout_samples": len(heldout.samples) if heldout else 0,
            "heldout_losses": state.heldout,
            "kept_step": kept_step,
        },
    )
    return TuneResult(
        base_dir=base,
        adapter_dir=adapter_dir,
        merged_dir=merged_dir,
        summary=summary,
        steps=state.step,
        resumed_from=resumed_from,
        tokens=state.tokens,
        seconds=state.seconds,
        loss=state.loss,
        samples=len(dataset.samples),
        dropped=dataset.dropped,
        cut=dataset.cut,
        kept_step=kept_step,
        heldout=tuple((int(step), loss) for step, loss in state.heldout),
    )


def learning_rate(config: TuneConfig, step: int, elapsed_s: float) -> float:
    """The rate of the step after `step` steps, `elapsed_s` into this run: a linear warmup, then
    the peak; with `lr_decay`, a linear fall to zero at whichever bound comes first, `steps` in
    all or this run's `minutes` (a run resumed under `minutes` decays over its own)."""
    warm = config.lr * min(1.0, (step + 1) / WARMUP_STEPS)
    if not config.lr_decay:
        return warm
    done = max(
        step / config.steps if config.steps is not None else 0.0,
        elapsed_s / (config.minutes * 60) if config.minutes else 0.0,
    )
    return warm * max(0.0, 1.0 - done)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware; emulated bf16 is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(name: str, device: str) -> torch.dtype:
    import torch

    if name == "auto":
        native = torch.cuda.is_bf16_supported() if device.startswith("cuda") else native_bf16()
        name = "bf16" if native else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def _run_identity(
    config: TuneConfig, base: Path, dataset: Dataset, heldout: Dataset | None, dtype: torch.dtype
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: everything but the bounds."""
    return {
        "base": str(base),
        "data_sha256": dataset.sha256,
        "heldout_sha256": heldout.sha256 if heldout else "",
        "heldout_every": config.heldout_every,
        "rank": config.rank,
        "alpha": config.lora_alpha,
        "dropout": config.dropout,
        "lr": config.lr,
        "lr_decay": config.lr_decay,
        "prompt_weight": config.prompt_weight,
        "target_modules": list(config.target_modules),
        "top_layers": config.top_layers,
        "max_seq_tokens": config.max_seq_tokens,
        "batch_tokens": config.batch_tokens,
        "seed": config.seed,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _step(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    batches: list[list[Sample]],
    lr: float,
    prompt_weight: float,
    device: str,
) -> float:
    """One optimizer step over the micro-batches, its gradient accumulated across them; the
    weighted mean loss over their learned tokens."""
    import torch

    weight = sum(_weight(sample, prompt_weight) for batch in batches for sample in batch)
    loss = 0.0
    for batch in batches:
        part = _loss_sum(model, batch, prompt_weight, device) / weight
        part.backward()
        loss += part.item()
    for group in optimizer.param_groups:
        group["lr"] = lr
        torch.nn.utils.clip_grad_norm_(group["params"], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _weight(sample: Sample, prompt_weight: float) -> float:
    return sample.target_tokens + prompt_weight * len(_code(sample, prompt_weight))


def _code(sample: Sample, prompt_weight: float) -> range:
    """The prompt's tokens learned: its own code but the first token, which nothing predicts."""
    return range(max(sample.code[0], 1), sample.code[1]) if prompt_weight else range(0)


def _loss_sum(
    model: PeftModel, batch: list[Sample], prompt_weight: float, device: str
) -> torch.Tensor:
    """The weighted, summed cross-entropy of the batch's learned tokens: the target's, and the
    prompt's own code at prompt_weight. The vocabulary projection is applied to those positions
    only, a chunk at a time and recomputed in the backward: Qwen's 152k-token logits over 2k
    positions would take 1.2 GB in fp32, twice over for the softmax."""
    import torch
    from torch.utils.checkpoint import checkpoint

    longest = max(len(sample.ids) for sample in batch)
    ids = torch.zeros((len(batch), longest), dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    rows, columns, labels, weights = [], [], [], []
    for row, sample in enumerate(batch):
        ids[row, : len(sample.ids)] = torch.tensor(sample.ids)
        mask[row, : len(sample.ids)] = 1
        learned = [*_code(sample, prompt_weight), *range(sample.prompt_tokens, len(sample.ids))]
        rows += [row] * len(learned)
        columns += [at - 1 for at in learned]  # each position predicts the next token
        labels += [sample.ids[at] for at in learned]
        weights += [prompt_weight if at < sample.prompt_tokens else 1.0 for at in learned]
    lm = model.get_base_model()
    hidden = lm.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device))
    at = (torch.tensor(rows, device=device), torch.tensor(columns, device=device))
    chosen = hidden.last_hidden_state[at]
    targets = torch.tensor(labels, device=device)
    scale = torch.tensor(weights, device=device)
    head = lm.get_output_embeddings()

    def chunk_loss(states: torch.Tensor, wanted: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        logits = head(states).float()
        return (torch.nn.functional.cross_entropy(logits, wanted, reduction="none") * by).sum()

    return sum(
        (
            checkpoint(
                chunk_loss,
                chosen[i : i + LOGIT_CHUNK],
                targets[i : i + LOGIT_CHUNK],
                scale[i : i + LOGIT_CHUNK],
                use_reentrant=False,
            )
            for i in range(0, len(labels), LOGIT_CHUNK)
        ),
        torch.zeros((), device=device),
    )


class _Best:
    """The adapter of the lowest held-out loss so far (the earliest of equals), in memory and
    in the checkpoint, where a resumed run finds it."""

    FILE = "best.safetensors"

    def __init__(self) -> None:
        self.step, self.loss = -1, math.inf
        self.weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def resumed(cls, checkpoint: Path, state: _State) -> _Best:
        from safetensors.torch import load_file

        best = cls()
        if state.heldout:
            step, best.loss = min(state.heldout, key=lambda measured: measured[1])
            best.step, best.weights = int(step), load_file(str(checkpoint / cls.FILE))
        return best

    def consider(self, model: PeftModel, step: int, loss: float) -> None:
        from peft import get_peft_model_state_dict

        if loss < self.loss:
            self.step, self.loss = step, loss
            weights = get_peft_model_state_dict(model).items()
            self.weights = {name: tensor.detach().clone() for name, tensor in weights}

    def restore(self, model: PeftModel) -> int:
        """Puts the kept adapter into `model`; its step."""
        from peft import set_peft_model_state_dict

        if self.weights is not None:
            set_peft_model_state_dict(model, self.weights)
        return self.step


def heldout_loss(
    model: PeftModel, heldout: Dataset, prompt_weight: float, device: str, micro_batch_tokens: int
) -> float:
    """The training loss on the held-out samples, each once, with dropout off."""
    import torch

    everything = sum(len(sample.ids) for sample in heldout.samples)
    micro_batches, _ = plan_step(heldout, 0, 0, everything, micro_batch_tokens)
    weight = sum(_weight(sample, prompt_weight) for sample in heldout.samples)
    model.eval()
    try:
        with torch.no_grad():
            total = sum(
                _loss_sum(model, [heldout.samples[i] for i in batch], prompt_weight, device).item()
                for batch in micro_batches
            )
    finally:
        model.train()
    return total / weight


def _save_checkpoint(
    checkpoint: Path,
    run: dict[str, Any],
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    state: _State,
    best: _Best,
) -> None:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    def save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))

    def save(directory: Path) -> None:
        save_weights(get_peft_model_state_dict(model), directory / "adapter.safetensors")
        if best.weights is not None:
            save_weights(best.weights, directory / best.FILE)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        trainer = {"run": run, "state": asdict(state), "optimizer": optimizer.state_dict()}
        torch.save({**trainer, "rng": rng}, directory / "trainer.pt")

    _replace_dir(checkpoint, save)


def _resume(
    checkpoint: Path, run: dict[str, Any], model: PeftModel, optimizer: torch.optim.Optimizer
) -> _State:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = torch.load(checkpoint / "trainer.pt", weights_only=True)
    differ = sorted(key for key in run if saved["run"].get(key) != run[key])
    if differ:
        raise TrainingError(
            f"{checkpoint} is another run's (it differs in {', '.join(differ)}): "
            "give another out directory, or delete it to start over"
        )
    set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter.safetensors")))
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return _State(**saved["state"])


def _replace_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """`write` fills a fresh directory that then takes target's place, so that an interruption
    never leaves a half-written one there."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(partial, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _write_json(path: Path, value: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def _print_progress(progress: Progress) -> None:
    print(progress.describe(), file=sys.stderr, flush=True)
