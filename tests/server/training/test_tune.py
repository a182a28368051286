"""The fine-tune on a tiny Llama: samples tokenized as the engine reads them, fitted to a length,
dealt deterministically; loss that falls; a checkpoint a second run goes on from; what it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ghostpen import cli
from ghostpen.context.template import load_template
from ghostpen.server.errors import ModelError, TrainingError
from ghostpen.server.model_store import REGISTRY
from ghostpen.server.training.dataset import fit, plan_step, read_dataset
from ghostpen.server.training.tune import (
    TARGET_MODULES,
    WARMUP_STEPS,
    Progress,
    TuneConfig,
    learning_rate,
    tune,
)
from tests.tiny_model import SPECIAL_TOKENS, build_tiny_llama

TEMPLATE = load_template("qwen25-coder-repo-fim")
END = "<|endoftext|>"


def rendered(prefix: str, suffix: str = "\n") -> str:
    """A prompt as the serving template renders it: repository, a context file, the cursor's."""
    return (
        TEMPLATE.repo_header.format(repo="acme/shop")
        + TEMPLATE.context_file.format(path="money.py", text="CENTS = 100\n")
        + TEMPLATE.current_file.format(path="cart.py")
        + TEMPLATE.body.format(prefix=prefix, suffix=suffix)
    )


SAMPLES = [
    {"prompt": rendered("def total(items):\n    "), "target": f"return sum(items){END}"},
    {"prompt": rendered("def cents(x):\n    "), "target": f"return x * CENTS{END}", "id": 7},
    {
        "prompt": rendered("import json\n\ndef load(p):\n    "),
        "target": f"return json.load(p){END}",
    },
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "samples.jsonl"
    path.write_text("".join(json.dumps(sample) + "\n" for sample in SAMPLES * 4))
    return path


def config(base: Path, data: Path, out: Path, **changes: object) -> TuneConfig:
    """Small steps at a high constant rate: a few samples a step, a visible fall within ten."""
    fields = {"steps": 10, "lr": 5e-3, "lr_decay": False, "prompt_weight": 0.1, "rank": 8}
    fields |= {"alpha": 32, "batch_tokens": 128, "dtype": "fp32"}
    return TuneConfig(data, out, str(base), base.parent, **{**fields, **changes})


def test_special_token_texts_become_their_special_ids(base: Path, data: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset = read_dataset(data, tokenizer, max_seq_tokens=512)
    first = dataset.samples[0]
    special = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    assert set(special.values()) <= set(tokenizer.all_special_ids)
    prompt = first.ids[: first.prompt_tokens]
    for token in ("<|repo_name|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"):
        assert prompt.count(special[token]) == 1, token
    assert prompt.count(special["<|file_sep|>"]) == 2
    assert prompt[0] == special["<|repo_name|>"]  # no BOS: this tokenizer adds none
    assert prompt[-1] == special["<|fim_middle|>"]  # generation starts right after it
    assert first.ids[-1] == special[END] == tokenizer.eos_token_id
    assert tokenizer.decode(first.ids[first.prompt_tokens :]) == SAMPLES[0]["target"]


@pytest.mark.parametrize(
    ("prompt", "target", "limit", "expected"),
    [
        ([1, 2, 3], [4, 5], 8, ([1, 2, 3, 4, 5], 3, (1, 2))),  # fits
        ([1, 2, 3], [4, 5], 5, ([1, 2, 3, 4, 5], 3, (1, 2))),  # exactly
        ([1, 2, 3], [4, 5], 4, ([2, 3, 4, 5], 2, (0, 1))),  # the prompt loses its start
        ([1, 2, 3], [4, 5], 3, ([3, 4, 5], 1, (0, 0))),  # one token of prompt is enough
        ([1, 2, 3], [4, 5], 2, None),  # the target alone fills it: nothing predicts its first
        ([1, 2, 3], [], 8, None),  # nothing to learn
        ([], [4, 5], 8, None),  # nothing to learn from
    ],
)
def test_a_sample_is_fitted_by_cutting_its_prompt_from_the_left(
    prompt: list[int],
    target: list[int],
    limit: int,
    expected: tuple[list[int], int, tuple[int, int]] | None,
) -> None:
    """The prompt's own code is its second token here, and moves with the cut."""
    sample = fit(prompt, target, limit, code=(1, 2))
    assert (sample and (list(sample.ids), sample.prompt_tokens, sample.code)) == expected


def test_the_prompts_own_code_is_its_prefix_window(base: Path, tmp_path: Path) -> None:
    """Learned at prompt_weight: the file's text before the cursor, not the template's markers
    or the context files."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    prefix = "def total(items):\n    "
    path = tmp_path / "samples.jsonl"
    lines = [{**SAMPLES[0], "prefix": prefix}, SAMPLES[1]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with_prefix, without = read_dataset(path, tokenizer, max_seq_tokens=512).samples
    start, end = with_prefix.code
    assert tokenizer.decode(with_prefix.ids[start:end]) == prefix
    assert tokenizer.decode(with_prefix.ids[start - 1 : start]) == "<|fim_prefix|>"
    assert without.code[0] == without.code[1]  # no prefix given: nothing of it learned


def test_reading_counts_what_was_cut_and_dropped(base: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base)
    lengths = [len(tokenizer(s["prompt"])["input_ids"]) for s in SAMPLES]
    path = tmp_path / "mixed.jsonl"
    lines = [*SAMPLES, {"prompt": "x = ", "target": "1" * 400 + END}, {"prompt": "y", "target": ""}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    limit = min(lengths) + 3  # every sample's target is longer than 3 tokens
    dataset = read_dataset(path, tokenizer, max_seq_tokens=limit)
    assert (len(dataset.samples), dataset.cut, dataset.dropped) == (3, 3, 2)
    assert all(len(sample.ids) == limit for sample in dataset.samples)
    with pytest.raises(TrainingError, match="no sample that fits"):
        read_dataset(path, tokenizer, max_seq_tokens=2)


def test_a_line_is_split_at_newlines_only(base: Path, tmp_path: Path) -> None:
    """JSON may hold U+2028 (a line separator to str.splitlines) unescaped."""
    path = tmp_path / "samples.jsonl"
    sample = {"prompt": rendered("s = '\u2028'\n"), "target": f"t = 1{END}"}
    path.write_text(json.dumps(sample, ensure_ascii=False) + "\r\n", encoding="utf-8")
    dataset = read_dataset(path, AutoTokenizer.from_pretrained(base), max_seq_tokens=512)
    assert len(dataset.samples) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"bad\.jsonl:2: not JSON"),
        (b'{"prompt": "x"}', r"bad\.jsonl:2: wants an object"),
        (b'["x", "y"]', r"bad\.jsonl:2: wants an object"),
        (b'{"prompt": "x", "target": 1}', r"bad\.jsonl:2: wants an object"),
        (b'{"prompt": "\xff"}', r"bad\.jsonl: not UTF-8"),
    ],
)
def test_a_malformed_line_is_refused_by_its_number(
    base: Path, tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(SAMPLES[0]).encode() + b"\n" + content + b"\n")
    with pytest.raises(TrainingError, match=message):
        read_dataset(path, AutoTokenizer.from_pretrained(base), max_seq_tokens=512)


def test_steps_deal_every_sample_once_a_pass_in_a_seeded_order(base: Path, data: Path) -> None:
    dataset = read_dataset(data, AutoTokenizer.from_pretrained(base), max_seq_tokens=512)
    count = len(dataset.samples)
    longest = max(len(sample.ids) for sample in dataset.samples)
    dealt, position, steps = [], 0, []
    while position < 3 * count:
        batches, position = plan_step(dataset, 1, position, 100, 2 * longest)
        steps.append((batches, position))
        dealt += [index for batch in batches for index in batch]
        for batch in batches:  # padded to its longest, no micro-batch over its tokens
            assert len(batch) * max(len(dataset.samples[i].ids) for i in batch) <= 2 * longest
    for start in range(0, 3 * count - count + 1, count):
        assert sorted(dealt[start : start + count]) == list(range(count))
    assert dealt[:count] != dealt[count : 2 * count]  # each pass shuffled anew
    # the same step from the same position, whatever came before; another seed, another order
    assert plan_step(dataset, 1, steps[2][1], 100, 2 * longest) == steps[3]
    assert plan_step(dataset, 2, 0, 100, 2 * longest)[0] != steps[0][0]


def test_loss_falls_and_the_adapter_and_merged_model_are_written(
    base: Path, data: Path, tmp_path: Path
) -> None:
    seen: list[Progress] = []
    result = tune(config(base, data, tmp_path / "out", steps=20), seen.append)
    assert [p.step for p in seen] == list(range(1, 21))
    assert sum(p.loss for p in seen[-3:]) < 0.7 * sum(p.loss for p in seen[:3])
    assert all(p.tokens_per_s > 0 and p.elapsed_s > 0 for p in seen)
    assert (result.steps, result.resumed_from, result.loss) == (20, 0, seen[-1].loss)
    assert (result.samples, result.dropped, result.cut) == (12, 0, 0)
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["base_model_name_or_path"]) == (
        8,
        32,
        str(base),
    )
    before, after = load_file(base / "model.safetensors"), merged_weights(result.merged_dir)
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    targeted = {name for name in before if name.split(".")[-2] in TARGET_MODULES}
    assert len(targeted) == 2 * 7 and changed == targeted  # every layer's projections, no more
    assert {t.dtype for t in after.values()} == {torch.bfloat16}  # the base's own dtype
    assert (result.merged_dir / "tokenizer.json").is_file()
    summary = json.loads(result.summary.read_text())
    assert summary["steps"] == 20 and summary["tokens"] == result.tokens > 0
    assert summary["dtype"] == "float32" and summary["tokens_per_s"] > 0
    assert summary["target_modules"] == list(TARGET_MODULES)


@pytest.fixture(scope="module")
def contrary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training prompts with other targets: the better a run learns its data, the worse
    its loss on these."""
    path = tmp_path_factory.mktemp("contrary") / "heldout.jsonl"
    lines = [{**sample, "target": "@@ ~~ ?? !! %%"} for sample in SAMPLES]  # tokens it never sees
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_the_adapter_of_the_lowest_heldout_loss_is_the_one_written(
    base: Path, data: Path, contrary: Path, tmp_path: Path
) -> None:
    seen: list[Progress] = []
    overfit = config(
        base, data, tmp_path / "out", heldout=contrary, heldout_every=4, prompt_weight=0.0
    )
    result = tune(overfit, seen.append)
    measured = [(p.step, p.heldout_loss) for p in seen if p.heldout_loss is not None]
    assert [step for step, _ in measured] == [0, 4, 8, 10]  # before, every 4, and the last
    assert result.heldout == tuple(measured) and measured[-1][1] > measured[0][1]
    assert result.kept_step == min(measured, key=lambda m: m[1])[0] != 10
    summary = json.loads(result.summary.read_text())
    assert (summary["kept_step"], summary["heldout_samples"]) == (result.kept_step, 3)
    assert result.steps == 10 and seen[0].describe().startswith("before training, held-out")
    # what was written is the adapter a run that stopped at the kept step writes
    stopped = tune(config(base, data, tmp_path / "stopped", steps=max(result.kept_step, 1)))
    kept, plain = (
        load_file(r.adapter_dir / "adapter_model.safetensors") for r in (result, stopped)
    )
    if result.kept_step:
        assert kept.keys() == plain.keys() and all(torch.equal(kept[k], plain[k]) for k in kept)
    else:  # the base itself: LoRA's B starts at zero
        assert all(not tensor.any() for name, tensor in kept.items() if "lora_B" in name)

    learnt = tune(config(base, data, tmp_path / "learnt", heldout=data, heldout_every=4))
    assert learnt.kept_step == 10  # its own data: the loss falls to the last step
    assert [step for step, _ in learnt.heldout] == [0, 4, 8, 10]


def test_a_resumed_run_keeps_its_heldout_losses_and_best_adapter(
    base: Path, data: Path, contrary: Path, tmp_path: Path
) -> None:
    fields = {"heldout": contrary, "heldout_every": 4, "prompt_weight": 0.0}
    whole = tune(config(base, data, tmp_path / "whole", **fields))
    tune(config(base, data, tmp_path / "halves", **{**fields, "steps": 5}))
    resumed = tune(config(base, data, tmp_path / "halves", **fields))
    assert resumed.resumed_from == 5
    assert [step for step, _ in resumed.heldout] == [0, 4, 5, 8, 10]  # 5: where the first ended
    assert resumed.kept_step == whole.kept_step
    kept = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in (whole, resumed)]
    assert all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])


def test_lora_on_the_top_layers_leaves_the_lower_ones_as_they_were(
    base: Path, data: Path, tmp_path: Path
) -> None:
    result = tune(config(base, data, tmp_path / "out", steps=3, top_layers=1))
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert adapter and all(".layers.1." in name for name in adapter)
    before, after = load_file(base / "model.safetensors"), merged_weights(result.merged_dir)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith("model.layers.1.") for name in changed)
    with pytest.raises(TrainingError, match="top_layers is 3; the model has 2 layers"):
        tune(config(base, data, tmp_path / "other", steps=1, top_layers=3))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    base: Path, data: Path, tmp_path: Path
) -> None:
    whole: list[Progress] = []
    uninterrupted = tune(config(base, data, tmp_path / "whole", steps=6), whole.append)
    first: list[Progress] = []
    tune(config(base, data, tmp_path / "halves", steps=3), first.append)
    second: list[Progress] = []
    resumed = tune(config(base, data, tmp_path / "halves", steps=6), second.append)
    assert resumed.resumed_from == 3
    assert [p.step for p in second] == [4, 5, 6]
    assert [p.loss for p in first + second] == [p.loss for p in whole]
    assert resumed.tokens == uninterrupted.tokens
    a = load_file(uninterrupted.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a run whose steps are all done writes its outputs again and trains no more
    again = tune(config(base, data, tmp_path / "halves", steps=6), second.append)
    assert (again.steps, again.resumed_from, len(second)) == (6, 6, 3)


def test_the_rate_warms_up_then_stays_or_falls_to_zero_at_the_first_bound(
    base: Path, data: Path, tmp_path: Path
) -> None:
    constant = config(base, data, tmp_path, steps=10, lr=1e-3)
    assert [learning_rate(constant, step, 0.0) for step in (2, 5, 9)] == [1e-3] * 3
    by_steps = config(base, data, tmp_path, steps=10, lr=1e-3, lr_decay=True)
    rates = [learning_rate(by_steps, step, 0.0) for step in range(10)]
    assert rates[:WARMUP_STEPS] == sorted(rates[:WARMUP_STEPS])  # warming up
    assert rates[WARMUP_STEPS - 1 :] == sorted(rates[WARMUP_STEPS - 1 :], reverse=True)
    assert rates[5] == pytest.approx(0.5e-3)  # halfway through the steps, half the peak
    assert rates[9] == pytest.approx(0.1e-3)  # the last step, the smallest
    by_time = config(base, data, tmp_path, steps=None, minutes=10.0, lr=1e-3, lr_decay=True)
    assert learning_rate(by_time, 50, 300.0) == pytest.approx(0.5e-3)  # half the minutes
    assert learning_rate(by_time, 50, 600.0) == 0.0
    both = config(base, data, tmp_path, steps=100, minutes=10.0, lr=1e-3, lr_decay=True)
    assert learning_rate(both, 80, 60.0) == pytest.approx(0.2e-3)  # the steps end first
    assert learning_rate(both, 10, 480.0) == pytest.approx(0.2e-3)  # the minutes end first


def test_a_checkpoint_of_another_run_is_refused(base: Path, data: Path, tmp_path: Path) -> None:
    tune(config(base, data, tmp_path / "out", steps=1))
    with pytest.raises(TrainingError, match=r"another run's \(it differs in lr, rank\)"):
        tune(config(base, data, tmp_path / "out", steps=2, lr=1e-3, rank=4))


def test_a_run_out_of_time_starts_no_step_and_keeps_its_checkpoint(
    base: Path, data: Path, tmp_path: Path
) -> None:
    tune(config(base, data, tmp_path / "out", steps=2))
    result = tune(config(base, data, tmp_path / "out", steps=None, minutes=0.0))
    assert (result.steps, result.resumed_from) == (2, 2)
    assert (tmp_path / "out" / "checkpoint" / "trainer.pt").is_file()


def test_a_registry_base_not_yet_converted_says_how_to_convert_it(
    data: Path, tmp_path: Path
) -> None:
    name = next(iter(REGISTRY))
    with pytest.raises(ModelError, match=f"ghostpen models convert {name}"):
        tune(TuneConfig(data, tmp_path / "out", name, tmp_path))


def test_auto_picks_bf16_only_where_the_cpu_has_it(base: Path, data: Path, tmp_path: Path) -> None:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    result = tune(config(base, data, tmp_path / "out", steps=1, dtype="auto"))
    dtype = json.loads(result.summary.read_text())["dtype"]
    assert dtype == ("bfloat16" if native else "float32")


def test_bf16_trains_too(base: Path, data: Path, tmp_path: Path) -> None:
    """bf16 is emulated on CPUs without it in hardware: slow there, but it must work."""
    result = tune(config(base, data, tmp_path / "out", steps=2, dtype="bf16"))
    assert json.loads(result.summary.read_text())["dtype"] == "bfloat16"


def test_the_command_line_tunes(
    base: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["tune", "--data", str(data), "--out", str(out), "--base", str(base), "--steps", "2"]
    argv += ["--dtype", "fp32", "--seed", "3", "--batch-tokens", "128", "--no-lr-decay"]
    assert cli.main([*argv, "--rank", "4"]) == 0
    summary = json.loads((out / "tune.json").read_text())
    assert (summary["steps"], summary["rank"], summary["seed"]) == (2, 4, 3)
    assert summary["alpha"] == 8  # twice the rank, whatever the rank
    assert summary["lr_decay"] is False  # --no-lr-decay: without it the rate falls
    assert "step 2: loss" in capsys.readouterr().err
    assert cli.main([*argv, "--rank", "8"]) == 2  # another run's checkpoint: refused, said why
    assert "differs in alpha, rank" in capsys.readouterr().err  # alpha follows the rank
    assert cli.main([*argv, "--batch-tokens", "0"]) == 2  # refused before it reads any data
    assert "batch_tokens and rank must be at least 1: 0, 64" in capsys.readouterr().err


def merged_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights
