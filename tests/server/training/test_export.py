"""`ghostpen data export`: samples in the serving format, from kept completions and a repository;
screened, deduplicated, and split by file and time without leaks."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import uuid
from collections import Counter
from pathlib import Path

import pytest

from ghostpen.cli import main
from ghostpen.context.chunker import Chunk
from ghostpen.context.postprocess import CursorSurroundings, first_cut
from ghostpen.context.prompt import render
from ghostpen.context.settings import ContextSettings
from ghostpen.context.template import load_template
from ghostpen.server.errors import TrainingError
from ghostpen.server.telemetry.records import CaptureRecord, CompletionRecord, TelemetryEvent
from ghostpen.server.telemetry.store import Store
from ghostpen.server.training.export import (
    ExportConfig,
    Sample,
    export,
    prompt_in,
    read_samples,
    target_of,
)
from ghostpen.server.training.tasks import mode_of

FIM = load_template("qwen25-coder-repo-fim")
PREFIX = load_template("generic-prefix")
DAY = 86_400
NOW = 1_790_000_000
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"  # AWS's documented example key: what its scanner looks for


def module(name: str, index: int, uses: str = "") -> str:
    return (
        f'"""Module {name}."""\n\n\n'
        + (f"import {uses}\n\n\n" if uses else "")
        + f"def {name}_total(items):\n"
        f"    total = 0\n"
        f"    for item in items:\n"
        f"        total += item.price * {index + 1}\n"
        f"    return total\n\n\n"
        f"class {name.title()}Cart:\n"
        f"    def __init__(self, owner):\n"
        f"        self.owner = owner\n"
        f"        self.items = []\n\n"
        f"    def add(self, item):\n"
        f"        self.items.append(item)\n"
        f"        return {name}_total(self.items)\n"
    )


def git_repo(root: Path, names: list[str], gap_days: int = 1) -> Path:
    """A repository whose files were last committed `gap_days` apart, the first the oldest;
    each imports the one before it."""
    root.mkdir()

    def git(*args: str, when: int = NOW) -> None:
        stamp = f"@{when} +0000"
        env = {**os.environ, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
            cwd=root, env=env, check=True, capture_output=True,
        )  # fmt: skip

    git("init", "-q")
    for index, name in enumerate(names):
        (root / f"{name}.py").write_text(module(name, index, names[index - 1] if index else ""))
        git("add", f"{name}.py")
        git("commit", "-q", "-m", name, when=NOW - (len(names) - index) * gap_days * DAY)
    return root


def config(out: Path, **fields: object) -> ExportConfig:
    return ExportConfig(out=out, template=FIM, context=ContextSettings(), **fields)


def test_a_repository_splits_by_file_and_time_without_leaks(tmp_path: Path) -> None:
    names = [f"shop{i}" for i in range(40)]
    repo = git_repo(tmp_path / "shop", names)
    context = ContextSettings(top_k=1)  # the one file open beside: the one it imports
    exported = ExportConfig(tmp_path / "out", FIM, context, repo_samples=300)
    manifest = export(exported, None, [repo])
    train = read_samples(tmp_path / "out" / "train.jsonl")
    heldout = read_samples(tmp_path / "out" / "heldout.jsonl")
    assert train and heldout
    held = {s.file for s in heldout}
    assert not {s.file for s in train} & held  # no file on both sides
    # nor in a training prompt's context: those that showed one were dropped, and counted
    assert not {f for s in train for f in s.context_files} & held
    assert {f for s in heldout for f in s.context_files} - held  # held-out prompts keep theirs
    assert manifest["dropped"]["held-out file in the context"] > 0
    for sample in train:
        assert all(f.removeprefix("shop/") in sample.prompt for f in sample.context_files)
    cutoff = manifest["split"]["cutoff_ms"]
    assert max(s.time_ms for s in train) <= cutoff
    assert "shop/shop39.py" in held  # the newest file is held out
    for sample in train + heldout:
        assert sample.prompt.startswith("<|repo_name|>shop\n") and "<|fim_middle|>" in sample.prompt
        assert sample.target.endswith("<|endoftext|>") and sample.target != "<|endoftext|>"
        assert sample.kind in ("line", "rest_of_line", "block")
        # its parts render it again, in its template or in another, on the same context
        assert prompt_in(sample, FIM) == sample.prompt
        in_prefix = prompt_in(sample, PREFIX)
        assert in_prefix.endswith(sample.prefix) and "<|fim_middle|>" not in in_prefix
        assert all(f"# Path: {c[0]}\n" in in_prefix for c in sample.context)
    assert len({s.sample_id for s in train + heldout}) == len(train) + len(heldout)
    counts = manifest["counts"]
    assert (counts["train"], counts["heldout"]) == (len(train), len(heldout))
    for name in ("train.jsonl", "heldout.jsonl"):
        digest = hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest()
        assert manifest["files"][name] == digest
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["hash"] == manifest["hash"] and on_disk["sources"][0]["head"]


def test_training_prompts_cut_to_smaller_budgets_and_held_out_ones_as_served(
    tmp_path: Path,
) -> None:
    repo = git_repo(tmp_path / "shop", [f"shop{i}" for i in range(12)])
    served = ContextSettings(top_k=1)
    exported = ExportConfig(tmp_path / "out", FIM, served, repo_samples=80, train_budgets=(20, 0))
    manifest = export(exported, None, [repo])
    train = read_samples(tmp_path / "out" / "train.jsonl")
    heldout = read_samples(tmp_path / "out" / "heldout.jsonl")
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["train_budgets"] == (20, 0) and on_disk["train_budgets"] == [20, 0]
    for sample in train:
        assert sample.context == () and sample.context_files == ()
        assert sample.prompt.count("<|file_sep|>") == 1  # the file being edited only
        assert served.tokens(sample.prefix) <= 20 + served.tokens(sample.prefix.split("\n")[-1])
        assert prompt_in(sample, FIM) == sample.prompt and sample.target.endswith("<|endoftext|>")
    assert any(sample.context for sample in heldout)  # as served: with the file beside
    assert max(len(s.prefix) for s in heldout) > max(len(s.prefix) for s in train)


def cut_of(kind: str, before: str, expected: str, after: str) -> Sample:
    return Sample(
        sample_id="", source="repo", file="shop/cart.py", language="python", kind=kind,
        time_ms=0, prompt="", target="", prefix=before, suffix=after, healed="",
        expected=expected, repo="shop", path="cart.py", context=(),
    )  # fmt: skip


def test_a_prefix_only_target_runs_to_where_serving_would_end_it() -> None:
    """Code read without its suffix has no end: the target goes on as the file does, up to the
    line at which post-processing would end a served completion at the text's end. Taught
    less, a tuned model ran on past a line's end and past a block's (session 16)."""
    source = module("shop", 0)
    head, body, tail = "    for item in items:\n        ", "total += item.price * 1", "\n    return"
    at = source.index(head) + len(head)
    block = cut_of("block", source[:at], body, source[at + len(body) :])
    assert target_of(PREFIX, block) == body + "\n    return total\n"
    line = cut_of("line", source[:at], body, source[at + len(body) :])
    assert target_of(PREFIX, line) == body + "\n"
    assert target_of(FIM, block) == body + "<|endoftext|>"
    last = "self.items.append(item)\n        return shop_total(self.items)"
    at = source.index(last)
    final = cut_of("block", source[:at], last, source[at + len(last) :])
    assert target_of(PREFIX, final) == last + "\n"  # the end of the file ends it
    assert tail in block.suffix


def test_exported_prefix_only_targets_end_where_serving_cuts_them(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "shop", [f"shop{i}" for i in range(20)])
    export(ExportConfig(tmp_path / "out", PREFIX, ContextSettings(), repo_samples=60), None, [repo])
    samples = read_samples(tmp_path / "out" / "train.jsonl")
    samples += read_samples(tmp_path / "out" / "heldout.jsonl")
    assert len(samples) >= 10 and any(s.kind == "block" for s in samples)
    ended = 0
    for sample in samples:
        cursor = CursorSurroundings.around(
            sample.prefix + sample.healed, sample.suffix, mode_of(sample.kind), PREFIX.stop,
            sample.language,
        )  # fmt: skip
        written = sample.target.removeprefix(sample.healed)
        cut = first_cut(written, cursor)
        if cut is None:  # the suffix window ran out before anything ended the text
            assert written == sample.expected + sample.suffix
            continue
        assert cut.length == len(sample.expected), sample.sample_id
        assert first_cut(written.removesuffix("\n"), cursor) in (None, cut)
        ended += 1
    assert ended > len(samples) / 2
    blocks = [s for s in samples if s.kind == "block" and s.target.strip() != s.expected.strip()]
    assert blocks  # a block's target shows the line that leaves it


def test_several_repositories_are_cut_and_split_as_one(tmp_path: Path) -> None:
    shop = git_repo(tmp_path / "shop", [f"shop{i}" for i in range(12)])
    cart = git_repo(tmp_path / "cart", [f"cart{i}" for i in range(12)])
    exported = ExportConfig(tmp_path / "out", FIM, ContextSettings(top_k=1), repo_samples=60)
    manifest = export(exported, None, [shop, cart])
    assert [(s["kind"], s["path"]) for s in manifest["sources"]] == [
        ("repo", str(shop)), ("repo", str(cart)),
    ]  # fmt: skip
    train = read_samples(tmp_path / "out" / "train.jsonl")
    heldout = read_samples(tmp_path / "out" / "heldout.jsonl")
    assert {s.repo for s in train} == {"shop", "cart"}
    assert all(s.file.startswith(f"{s.repo}/{s.repo}") for s in train + heldout)
    assert not {s.file for s in train} & {s.file for s in heldout}
    (tmp_path / "other").mkdir()
    twin = git_repo(tmp_path / "other" / "shop", ["a", "b"])
    with pytest.raises(TrainingError, match="different folder names"):
        export(config(tmp_path / "twin"), None, [shop, twin])


def test_files_written_at_one_time_are_held_out_in_a_seeded_order(tmp_path: Path) -> None:
    """An unpacked archive's files share one time: by name, the held-out files would be the
    tree's first corner (here a0, a1...), never a cross-section."""
    root = tmp_path / "unpacked"
    root.mkdir()
    for index in range(20):
        path = root / f"{'ab'[index % 2]}{index:02d}.py"
        path.write_text(module(path.stem, index))
        os.utime(path, (NOW, NOW))
    splits = []
    for run in ("one", "two"):
        config = ExportConfig(tmp_path / run, FIM, ContextSettings(), repo_samples=200)
        export(dataclasses.replace(config, heldout_files=0.0, heldout_recent=0.2), None, [root])
        splits.append(sorted({s.file for s in read_samples(tmp_path / run / "heldout.jsonl")}))
    assert splits[0] == splits[1]  # the same every time
    held = [f.removeprefix("unpacked/") for f in splits[0]]
    assert 2 <= len(held) < 10 and held != [f"a{i:02d}.py" for i in range(0, 2 * len(held), 2)]
    assert {name[0] for name in held} == {"a", "b"}  # a cross-section


def test_recently_changed_files_are_drawn_more_often(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "shop", ["old", "new"], gap_days=365)
    no_split = {"heldout_files": 0.0, "heldout_recent": 0.0}
    export(config(tmp_path / "out", repo_samples=24, **no_split), None, [repo])  # fewer than fit
    drawn = Counter(s.file for s in read_samples(tmp_path / "out" / "train.jsonl"))
    assert drawn["shop/new.py"] > 2 * drawn["shop/old.py"]


def test_a_file_with_a_secret_is_left_out_and_addresses_are_redacted(tmp_path: Path) -> None:
    repo = git_repo(tmp_path / "shop", ["cart", "orders", "billing"])
    (repo / "keys.py").write_text(module("keys", 9) + f'AWS_ACCESS_KEY_ID = "{AWS_KEY}"\n')
    (repo / "contact.py").write_text(module("contact", 7) + 'OWNER = "jane.doe@acme-corp.io"\n')
    manifest = export(config(tmp_path / "out", repo_samples=200), None, [repo])
    samples = read_samples(tmp_path / "out" / "train.jsonl")
    samples += read_samples(tmp_path / "out" / "heldout.jsonl")
    text = "".join(s.prompt + s.target for s in samples)
    assert AWS_KEY not in text and "jane.doe@acme-corp.io" not in text
    assert "shop/keys.py" not in {s.file for s in samples}
    assert manifest["dropped"]["repo file with a secret"] == 1
    assert manifest["privacy"]["email"] >= 1
    assert any(k.startswith("secret:") for k in manifest["privacy"])


COMPLETION = CompletionRecord(
    "c1", NOW * 1000, "qwen", "t@v1", "h", "llama.cpp", "python", "single_line", 9, 3, 1.0, 2.0,
    "stop", 7, user_id="alice", tenant="acme",
)  # fmt: skip
CAPTURE = CaptureRecord(
    "c1", NOW * 1000, "alice", "acme", "t@v1", "shop", "/home/alice/src/shop/cart.py", "python",
    "def total(cart):\n   ", "\n\nprint(total([]))", " ",
    json.dumps([{"path": "prices.py", "start_line": 0, "end_line": 2,
                 "text": "def price(item):\n    return item.price"}]),
    "return sum(cart)",
)  # fmt: skip


def retained(completion_id: str, fraction: float, final_text: str | None) -> TelemetryEvent:
    return TelemetryEvent(
        uuid.uuid4().hex, completion_id, "retention", NOW * 1000, NOW * 1000, after_s=300,
        fraction=fraction, present=fraction >= 0.5, file_closed=False, user_id="alice",
        final_text=final_text,
    )  # fmt: skip


@pytest.fixture
def captured_store(tmp_path: Path) -> Store:
    return kept_completions(tmp_path)


def kept_completions(tmp_path: Path) -> Store:
    """c1 kept and corrected; c2 kept as far as its first word was accepted; c3 mostly undone;
    c4 holds a key; c5 the same as c2; c6 accepted only minutes ago (no 5-minute check yet)."""
    store = Store.open(str(tmp_path / "telemetry.db"), tmp_path)
    ids = ["c1", "c2", "c3", "c4", "c5", "c6"]
    completions = [dataclasses.replace(COMPLETION, completion_id=i) for i in ids]
    captures = [
        CAPTURE,
        dataclasses.replace(CAPTURE, completion_id="c2", shown="return 0"),
        dataclasses.replace(CAPTURE, completion_id="c3"),
        dataclasses.replace(CAPTURE, completion_id="c4", prefix=f'KEY = "{AWS_KEY}"\n'),
        dataclasses.replace(CAPTURE, completion_id="c5", shown="return 0"),
        dataclasses.replace(CAPTURE, completion_id="c6"),
    ]
    events = [
        retained("c1", 0.8, "return sum(item.price for item in cart)"),
        retained("c2", 1.0, None),
        retained("c3", 0.2, "pass"),
        retained("c4", 1.0, None),
        retained("c5", 1.0, None),
        *(
            TelemetryEvent(uuid.uuid4().hex, c, "partially_accepted", NOW * 1000, NOW * 1000,
                           accepted_chars=6, unit="word", user_id="alice")
            for c in ("c2", "c5")
        ),
    ]  # fmt: skip
    store.write(completions, events, captures)
    return store


def test_kept_completions_teach_their_corrections(tmp_path: Path, captured_store: Store) -> None:
    manifest = export(
        config(tmp_path / "out", heldout_files=0.0, heldout_recent=0.0), captured_store
    )
    [corrected, as_shown] = read_samples(tmp_path / "out" / "train.jsonl")
    assert corrected.target == " return sum(item.price for item in cart)<|endoftext|>"
    assert as_shown.target == " return<|endoftext|>"  # what was accepted of "return 0"
    chunk = json.loads(CAPTURE.context)[0]
    context = [Chunk.of(chunk["path"], chunk["start_line"], chunk["end_line"], chunk["text"])]
    assert corrected.prompt == render(
        FIM, "shop", CAPTURE.path, "python", context, CAPTURE.prefix, CAPTURE.suffix
    )
    assert prompt_in(corrected, FIM) == corrected.prompt
    assert (corrected.source, corrected.file, corrected.kind) == (
        "capture",
        "shop/cart.py",
        "capture",
    )
    dropped = manifest["dropped"]
    assert dropped == {
        "retained below min_retained": 1,
        "capture with a secret": 1,
        "duplicate": 1,
    }
    assert manifest["counts"]["read"] == {"capture": 5}  # c6 has no 5-minute check yet
    assert any(k.startswith("secret:") for k in manifest["privacy"])


def test_a_captured_context_chunk_is_screened_too(tmp_path: Path) -> None:
    """The chunks are kept to render the prompt again: an address in one is redacted there as
    it is in the prompt."""
    store = Store.open(str(tmp_path / "telemetry.db"), tmp_path)
    chunk = {"path": "owners.py", "start_line": 0, "end_line": 1,
             "text": 'OWNER = "jane.doe@acme-corp.io"'}  # fmt: skip
    capture = dataclasses.replace(CAPTURE, context=json.dumps([chunk]))
    store.write([COMPLETION], [retained("c1", 1.0, None)], [capture])
    export(config(tmp_path / "out", heldout_files=0.0, heldout_recent=0.0), store)
    [sample] = read_samples(tmp_path / "out" / "train.jsonl")
    [(path, _, _, text)] = sample.context
    assert path == "owners.py" and text.startswith("OWNER = ") and "jane.doe" not in text
    assert prompt_in(sample, FIM) == sample.prompt and "jane.doe" not in sample.prompt
    store.close()


def test_deleting_captured_text_deletes_the_exports_that_hold_it(
    tmp_path: Path, captured_store: Store
) -> None:
    """alice of acme owns every capture; an export of the repository alone holds none."""
    repo = git_repo(tmp_path / "shop", ["cart", "orders"])
    holding, repo_only = tmp_path / "holding", tmp_path / "repo-only"
    export(config(holding), captured_store, [repo])
    export(config(repo_only, repo_samples=10), None, [repo])
    export(config(tmp_path / "again"), captured_store)
    files = [holding / name for name in ("train.jsonl", "heldout.jsonl", "manifest.json")]
    assert all(f.is_file() for f in files)

    assert captured_store.delete_captured("acme", "bob") == (0, 0)
    assert all(f.is_file() for f in files)  # bob's deletion leaves alice's export
    assert captured_store.delete_captured("globex") == (0, 0)
    assert all(f.is_file() for f in files)

    assert captured_store.delete_captured("acme", "alice")[0] > 0
    assert not any(f.exists() for f in files)
    assert not (tmp_path / "again" / "train.jsonl").exists()
    assert (repo_only / "train.jsonl").is_file()
    forgotten = captured_store.query("SELECT path FROM exports WHERE forgotten_ms IS NOT NULL")
    assert sorted(p for (p,) in forgotten) == [str(tmp_path / "again"), str(holding)]


def test_the_delete_command_names_the_exports_it_deleted(
    tmp_path: Path, captured_store: Store, capsys
) -> None:
    export(config(tmp_path / "out"), captured_store)
    captured_store.close()
    database = ["--set", f"database={tmp_path / 'telemetry.db'}"]
    assert main([*database, "data", "delete", "--tenant", "acme", "--user", "alice"]) == 0
    said = capsys.readouterr().out
    assert f"deleted the export holding it: {tmp_path / 'out'}" in said
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_expired_text_deletes_the_exports_holding_it(tmp_path: Path, captured_store: Store) -> None:
    export(config(tmp_path / "out"), captured_store)
    assert captured_store.delete_captured("*", before_ms=NOW * 1000) == (0, 0)  # none older
    assert (tmp_path / "out" / "train.jsonl").is_file()
    captured_store.delete_captured("*", before_ms=NOW * 1000 + 1)
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_the_export_command(tmp_path: Path, captured_store: Store, capsys) -> None:
    captured_store.close()
    repo = git_repo(tmp_path / "shop", ["cart", "orders"])
    lib = git_repo(tmp_path / "lib", ["money", "tax"])
    database = ["--set", f"database={tmp_path / 'telemetry.db'}"]
    out = tmp_path / "out"
    assert main([*database, "data", "export", "--out", str(out), "--repo", str(repo),
                 "--repo", str(lib), "--samples", "40",
                 "--template", "qwen25-coder-repo-fim"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    repos = [source["path"] for source in manifest["sources"] if source["kind"] == "repo"]
    assert repos == [str(repo), str(lib)]
    assert manifest["counts"]["by_source"]["capture"] == 2
    assert manifest["counts"]["by_source"]["repo"] > 0
    assert manifest["template"] == "qwen25-coder-repo-fim@v1"
    assert manifest["hash"] in capsys.readouterr().out
