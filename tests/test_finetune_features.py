"""finetune.py's training features on the real stories260K model and real GSM8K rows: packing, data parallel
under torchrun, gradient checkpointing, early stopping and keep-best (and their resume), TensorBoard, wandb, and
sharded full saves.

Every "same result" test compares against a plain run with LoRA dropout off, so the only difference left is the
order of floating-point sums. Runs are in-process (``utils.cli.run``) except the torchrun one; the runs several
tests read are module-scoped fixtures, made once.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import STORIES, gsm8k_rows, prepare_gsm8k, read_jsonl, run_finetune, tiny_config
from utils.training.batches import collate, collate_packed, pack
from utils.errors import SuiteError
from utils.cli import run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def flags(micro: int = 4, lr: str = "3e-3") -> list[str]:
    return ["--batch_size", "8", "--micro_batch_size", str(micro), "--lora_dropout", "0", "--learning_rate", lr,
            "--logging_steps", "0", "--seed", "3"]


PLAIN = [*flags(), "--max_steps", "4", "--eval_steps", "2"]
# A huge learning rate: the eval loss jumps around and stops improving within a few steps.
EARLY = [*flags(lr="0.3"), "--max_steps", "12", "--eval_steps", "1", "--early_stopping_patience", "2"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The 120 shortest of the first 2000 GSM8K rows with the short Alpaca template (examples of 118-202 tokens),
    cutoff 512: two or three examples share a packed row of 512 tokens. 16 validation examples."""
    rows = sorted(gsm8k_rows(2000), key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:120]
    return prepare_gsm8k(tmp_path_factory.mktemp("feat"), rows, "--cutoff_len", "512", "--val_set_size", "16",
                         "--prompt_template_name", "alpaca_short")


def finetune(out: Path, data: Path, *extra: str) -> Path:
    return run_finetune(out, data, *extra)

def train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def periodic_evals(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r and not r.get("final")]


def pipeline(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text(encoding="utf-8"))


def assert_losses_close(a: Path, b: Path, rel: float) -> None:
    la, lb = train_losses(a), train_losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb] and la, (la, lb)
    for (step, x), (_, y) in zip(la, lb):
        assert x == pytest.approx(y, rel=rel), (step, x, y)


def replay_early_stopping(evals: list[dict], patience: int) -> tuple[dict, int, int | None]:
    """(best, bad evaluations since it, step at which patience ran out) from a list of evaluations."""
    best, bad, stop = None, 0, None
    for e in evals:
        if best is None or e["eval_loss"] < best["eval_loss"]:
            best, bad = {"step": e["step"], "eval_loss": e["eval_loss"]}, 0
        else:
            bad += 1
        if patience and bad >= patience and stop is None:
            stop = e["step"]
    return best, bad, stop


@pytest.fixture(scope="module")
def plain(prepared, tmp_path_factory) -> Path:
    """LoRA, 4 steps, evaluation at step 2, TensorBoard on (the default)."""
    return finetune(tmp_path_factory.mktemp("plain") / "out", prepared, *PLAIN)


# --------------------------------------------------------------------------------------------------------------
# Packing





def features_config(kind: str):
    return tiny_config(kind, vocab=300, width=64, intermediate=128, positions=128 if kind == "gpt2" else None,
                       initializer_range=0.1, bos_token_id=1, eos_token_id=2, **({"pad_token_id": 0} if kind == "glm" else {}))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "glm"])
def test_packed_loss_equals_padded_loss(kind):
    from transformers import AutoModelForCausalLM

    from utils.training.evaluate import token_loss_sum
    from utils.training.methods import check_packing

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(features_config(kind)).eval()  # eval: GPT-2 has dropout
    check_packing(model)  # must not raise

    gen = torch.Generator().manual_seed(1)
    lengths = [9, 4, 13, 6, 2, 11, 7, 5]
    rows = []
    for n in lengths:
        ids = torch.randint(3, 300, (n,), generator=gen).tolist()
        rows.append((ids, [-100] * (n // 2) + ids[n // 2:]))  # prompt half masked
    capacity, per_micro = 16, 2
    bins = pack(list(range(len(rows))), lengths, capacity)
    micro = [[[rows[i] for i in b] for b in bins[j:j + per_micro]] for j in range(0, len(bins), per_micro)]
    # The case must exercise what packing has to get right: shared rows and a padding tail.
    assert any(len(b) > 1 for b in bins), bins
    assert any(sum(len(ids) for ids, _ in row) < max(sum(len(ids) for ids, _ in r) for r in m)
               for m in micro for row in m), bins

    with torch.no_grad():
        padded = float(token_loss_sum(model, collate(rows, 0), 0))
        packed = sum(float(token_loss_sum(model, collate_packed(m, 0), 0)) for m in micro)
        assert packed == pytest.approx(padded, rel=1e-5)
        # The comparison is sensitive: positions that do not restart (attention across examples) show.
        leaky = 0.0
        for m in micro:
            batch = collate_packed(m, 0)
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
            leaky += float(token_loss_sum(model, batch, 0))
        assert abs(leaky - padded) > 1e-4 * abs(padded), (leaky, padded)
    # Every trained token is still trained once packed (the first label of an example is never predicted).
    n_padded = int((collate(rows, 0)["labels"][:, 1:] != -100).sum())
    assert sum(int((collate_packed(m, 0)["labels"][:, 1:] != -100).sum()) for m in micro) == n_padded


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 64), data=st.data())
def test_pack_fits_capacity_and_uses_every_row_once(capacity, data):
    lengths = data.draw(st.lists(st.integers(1, capacity), min_size=0, max_size=40))
    rows = data.draw(st.permutations(range(len(lengths))))
    rows = rows[:data.draw(st.integers(0, len(rows)))]
    bins = pack(list(rows), lengths, capacity)
    assert sorted(i for b in bins for i in b) == sorted(rows)
    assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)
    # First fit: no two bins are both at most half full (the later one's rows would have fitted the earlier).
    assert sum(2 * sum(lengths[i] for i in b) <= capacity for b in bins) <= 1
    assert pack(list(rows), lengths, capacity) == bins  # deterministic


class _TokenModel(torch.nn.Module):
    """A minimal causal LM: logits from a running sum of the embeddings (``leaky``: over the whole row,
    ignoring position_ids, as an architecture without a block-diagonal mask would) or from each token alone."""

    def __init__(self, leaky: bool):
        super().__init__()
        torch.manual_seed(0)
        self.leaky = leaky
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, position_ids=None, use_cache=False, **kw):
        hidden = self.embed(input_ids)
        return types.SimpleNamespace(logits=self.head(hidden.cumsum(1) if self.leaky else hidden))


def test_check_packing_refuses_leaky_architecture():
    from utils.training.methods import check_packing

    check_packing(_TokenModel(leaky=False))  # no cross-token mixing at all: fine
    model = _TokenModel(leaky=True).train()
    with pytest.raises(SuiteError, match="--packing") as exc:
        check_packing(model)
    assert "_TokenModel" in str(exc.value)
    assert model.training  # the check leaves the training mode as it found it


@pytest.fixture(scope="module")
def packed(prepared, plain, tmp_path_factory):
    """The plain run with --packing; also how many examples each packed row held."""
    import utils.training.batches as batches

    real, per_row = batches.collate_packed, []

    def spy(bins, pad_id):
        per_row.extend(len(b) for b in bins)
        return real(bins, pad_id)

    batches.collate_packed = spy
    try:
        out = finetune(tmp_path_factory.mktemp("packed") / "out", prepared, *PLAIN, "--packing")
    finally:
        batches.collate_packed = real
    return out, per_row


@pytest.mark.slow
def test_packing_trains_like_padding(plain, packed):
    """Slow: Two training runs (padded, packed) compared step by step."""
    out, per_row = packed
    assert per_row and max(per_row) >= 2, per_row  # examples really shared rows
    assert_losses_close(out, plain, rel=1e-4)
    assert [e["eval_loss"] for e in periodic_evals(out)] == pytest.approx(
        [e["eval_loss"] for e in periodic_evals(plain)], rel=1e-4)
    assert pipeline(out)["final_eval"]["eval_loss"] == pytest.approx(pipeline(plain)["final_eval"]["eval_loss"],
                                                                     rel=1e-4)
    assert pipeline(out)["args"]["packing"] is True


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning"])
def test_packing_refused_for_virtual_token_methods(tmp_path, prepared, capsys, method):
    with pytest.raises(SystemExit) as exc:
        finetune(tmp_path / "out", prepared, *PLAIN, "--packing", "--method", method)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--packing" in err and f"--method {method}" in err
    assert not (tmp_path / "out").exists()  # refused before anything ran


# --------------------------------------------------------------------------------------------------------------
# Data parallel


def test_batch_size_must_divide_over_processes(tmp_path, prepared, capsys, monkeypatch):
    import finetune as ft
    from utils.cli import bind_args

    monkeypatch.setenv("WORLD_SIZE", "2")  # validation runs before any process group is made
    argv = ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exc:
        run(ft.main, [*argv, "--batch_size", "12", "--micro_batch_size", "4"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--batch_size 12 must be a multiple of --micro_batch_size 4 x 2 processes" in err
    assert not (tmp_path / "o").exists()
    ok = bind_args(ft.main, [*argv, "--batch_size", "16", "--micro_batch_size", "4"])
    ft.validate_args(ft.Args.from_flags(ok))  # 16 = 4 x 2 x 2: fine
    monkeypatch.setenv("WORLD_SIZE", "1")
    ft.validate_args(ft.Args.from_flags({**ok, "batch_size": 12}))


# --------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


@pytest.fixture(scope="module")
def checkpointed(prepared, tmp_path_factory):
    """The plain run with --gradient_checkpointing (and --notensorboard); also how many checkpointed calls ran."""
    import transformers.modeling_utils as mu

    real, calls = mu.checkpoint, []

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    mu.checkpoint = spy
    try:
        out = finetune(tmp_path_factory.mktemp("gc") / "out", prepared, *PLAIN, "--gradient_checkpointing",
                       "--notensorboard")
    finally:
        mu.checkpoint = real
    return out, len(calls)


@pytest.mark.slow
def test_gradient_checkpointing_same_losses(plain, checkpointed):
    """Slow: Two training runs (with and without activation checkpointing) compared step by step."""
    out, n_calls = checkpointed
    assert n_calls > 0  # activations really were recomputed
    assert_losses_close(out, plain, rel=1e-5)
    assert pipeline(out)["final_eval"]["eval_loss"] == pytest.approx(pipeline(plain)["final_eval"]["eval_loss"],
                                                                     rel=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Early stopping and keep-best


@pytest.fixture(scope="module")
def early(prepared, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("early")
    return {
        "best": finetune(root / "best", prepared, *EARLY, "--load_best_model_at_end", "--save_steps", "2"),
        "last": finetune(root / "last", prepared, *EARLY),
    }


@pytest.mark.slow
def test_early_stopping_and_keep_best(early):
    """Slow: Early stopping needs evaluations on a run that starts to overfit: a dozen steps with evaluation between them."""
    out = early["best"]
    meta, evals = pipeline(out), periodic_evals(out)
    assert meta["stopped_early"] is True and meta["steps"] < 12
    best, _, stop = replay_early_stopping(evals, patience=2)
    assert stop == meta["steps"] and evals[-1]["step"] == meta["steps"]  # stopped at the first evaluation it should
    assert meta["best"] == best == min(({"step": e["step"], "eval_loss": e["eval_loss"]} for e in evals),
                                        key=lambda b: b["eval_loss"])
    assert best["step"] < meta["steps"] and evals[-1]["eval_loss"] > best["eval_loss"]
    # Keep-best really restored the weights of the best evaluation: evaluating them gives its loss again.
    assert meta["final_eval"]["eval_loss"] == pytest.approx(best["eval_loss"], abs=1e-6)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(1, meta["steps"] + 1))


@pytest.mark.slow
def test_without_keep_best_the_last_weights_are_written(early):
    """Slow: Needs the early-stopping training runs."""
    out, ref = early["last"], early["best"]
    meta, evals = pipeline(out), periodic_evals(out)
    assert meta["stopped_early"] is True and meta["steps"] == pipeline(ref)["steps"]
    assert train_losses(out) == train_losses(ref) and evals == periodic_evals(ref)  # same trajectory
    assert meta["final_eval"]["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-6)
    assert meta["final_eval"]["eval_loss"] != pytest.approx(meta["best"]["eval_loss"], abs=1e-3)


@pytest.mark.parametrize("flag", [["--early_stopping_patience", "2"], ["--load_best_model_at_end"]])
def test_early_stopping_flags_need_eval_steps(tmp_path, prepared, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        finetune(tmp_path / "o", prepared, *flags(), "--max_steps", "2", *flag)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "need --eval_steps" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_resume_keeps_the_early_stopping_state(tmp_path, early, prepared):
    """The checkpoint holds the best evaluation, the bad-evaluation count and the best weights; a run resumed from
    it stops at the same step and writes the same weights as the uninterrupted one.
    Slow: An early-stopping run interrupted and resumed."""
    from safetensors.torch import load_file

    ref = early["best"]
    meta = pipeline(ref)
    ckpts = sorted((int(p.name.split("-")[1]), p) for p in ref.glob("checkpoint-*"))
    step, ckpt = ckpts[-1]
    assert step < meta["steps"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    best, bad, _ = replay_early_stopping([e for e in periodic_evals(ref) if e["step"] <= step], patience=2)
    assert state["step"] == step and state["best"] == best and state["bad_evals"] == bad
    # The case must make the state matter: the best is older than the checkpoint and evaluations have gone bad since.
    assert best["step"] < step and bad >= 1
    kept, current = load_file(str(ckpt / "best.safetensors")), load_file(str(ckpt / "trainable.safetensors"))
    assert kept.keys() == current.keys() and any(not torch.equal(kept[k], current[k]) for k in kept)

    out = finetune(tmp_path / "resumed", prepared, *EARLY, "--load_best_model_at_end", "--save_steps", "2",
                   "--resume_from_checkpoint", str(ckpt))
    resumed = pipeline(out)
    for key in ("steps", "stopped_early", "best", "final_eval"):
        assert resumed[key] == meta[key], key
    assert (out / "adapter_model.safetensors").read_bytes() == (ref / "adapter_model.safetensors").read_bytes()
    assert [r for r in read_jsonl(out / "metrics.jsonl")] == [r for r in read_jsonl(ref / "metrics.jsonl")
                                                               if r["step"] > step]


@pytest.mark.slow
def test_keep_best_never_writes_worse_weights_than_the_last(tmp_path, prepared, plain):
    """Slow: Training runs with evaluation between steps, compared with the plain run."""
    # plain: same run without keep-best; its eval loss keeps falling (step 2, then the final weights at step 4).
    assert pipeline(plain)["final_eval"]["eval_loss"] < periodic_evals(plain)[-1]["eval_loss"]
    out = finetune(tmp_path / "best", prepared, *PLAIN, "--load_best_model_at_end")
    assert train_losses(out) == train_losses(plain)
    meta = pipeline(out)
    assert meta["final_eval"]["eval_loss"] <= pipeline(plain)["final_eval"]["eval_loss"] + 1e-6
    assert meta["best"]["step"] == 4


# --------------------------------------------------------------------------------------------------------------
# TensorBoard and wandb


@pytest.mark.slow
def test_tensorboard_scalars_match_metrics(plain, checkpointed):
    """Slow: Reads the event files of two training runs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(plain / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    records = read_jsonl(plain / "metrics.jsonl")
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in records if "loss" in r], rel=1e-6)
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert lr == pytest.approx([r["lr"] for r in records if "loss" in r], rel=1e-6, abs=1e-12)
    evals = [(e.step, e.value) for e in acc.Scalars("eval/loss")]
    expected = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]  # periodic (2) and final (4)
    assert [s for s, _ in evals] == [s for s, _ in expected] == [2, 4]
    assert [v for _, v in evals] == pytest.approx([v for _, v in expected], rel=1e-6)
    assert "eval/token_accuracy" in acc.Tags()["scalars"]
    assert not (checkpointed[0] / "tensorboard").exists()  # --notensorboard writes none
    assert (checkpointed[0] / "metrics.jsonl").is_file()


def test_wandb_missing_package_is_refused(tmp_path, prepared, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, even where it is
    for extra in (["--wandb_project", "x"], ["--wandb_log_model"]):
        with pytest.raises(SystemExit) as exc:
            finetune(tmp_path / "o", prepared, *flags(), "--max_steps", "2", *extra)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "wandb" in err and not (tmp_path / "o").exists()
    assert "--wandb_log_model need --wandb_project" in err


FAKE_WANDB = '''
"""A stand-in for wandb that records every call into the JSON file named by FAKE_WANDB_LOG."""
import json, os

_calls = {"init": [], "log": [], "watch": [], "artifacts": [], "finish": 0}


def _dump():
    with open(os.environ["FAKE_WANDB_LOG"], "w") as f:
        json.dump(_calls, f, default=str)


class Artifact:
    def __init__(self, name, type, **kwargs):
        self.name, self.type, self.files = name, type, []

    def add_file(self, path, **kwargs):
        assert os.path.isfile(path), path
        self.files.append(os.path.basename(path))


class Run:
    id = "fakerun"

    def log(self, data, step=None, **kwargs):
        _calls["log"].append([dict(data), step])
        _dump()

    def log_artifact(self, artifact, **kwargs):
        _calls["artifacts"].append({"name": artifact.name, "type": artifact.type, "files": artifact.files})
        _dump()

    def finish(self, **kwargs):
        _calls["finish"] += 1
        _dump()


def init(**kwargs):
    _calls["init"].append(kwargs)
    _dump()
    return Run()


def watch(model, log=None, **kwargs):
    _calls["watch"].append({"log": log, "model": type(model).__name__})
    _dump()
'''


def test_wandb_receives_metrics_and_the_model(tmp_path, prepared, monkeypatch):
    package = tmp_path / "fake" / "wandb"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb_calls.json"
    monkeypatch.setenv("FAKE_WANDB_LOG", str(log))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    try:
        out = finetune(tmp_path / "out", prepared, *flags(), "--max_steps", "3", "--eval_steps", "2",
                       "--notensorboard", "--wandb_project", "p", "--wandb_run_name", "r", "--wandb_log_model",
                       "--wandb_watch", "gradients")
    finally:
        sys.modules.pop("wandb", None)
    calls = json.loads(log.read_text())
    assert len(calls["init"]) == 1
    init = calls["init"][0]
    assert init["project"] == "p" and init["name"] == "r" and init["config"]["learning_rate"] == 0.003
    assert calls["watch"] and calls["watch"][0]["log"] == "gradients"
    logged = {}
    for data, step in calls["log"]:
        logged.setdefault(step, {}).update(data)
    losses = dict(train_losses(out))
    assert sorted(s for s, d in logged.items() if "train/loss" in d) == [1, 2, 3]
    for step, loss in losses.items():
        assert logged[step]["train/loss"] == pytest.approx(loss) and "train/lr" in logged[step]
    assert logged[2]["eval/loss"] == pytest.approx(periodic_evals(out)[0]["eval_loss"])
    assert any(d.get("eval/loss") == pytest.approx(pipeline(out)["final_eval"]["eval_loss"])
               for d, s in calls["log"] if s == 3)
    assert len(calls["artifacts"]) == 1
    artifact = calls["artifacts"][0]
    assert artifact["type"] == "model" and artifact["name"] == "model-fakerun"
    assert {"adapter_model.safetensors", "adapter_config.json", "pipeline.json"} <= set(artifact["files"])
    assert calls["finish"] == 1


# --------------------------------------------------------------------------------------------------------------
# Full fine-tune, sharded save


def _state(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.state_dict()


def _shard_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("model-*-of-*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_full_finetune_writes_shards_that_load(tmp_path, prepared):
    out = finetune(tmp_path / "full", prepared, *flags(), "--method", "full", "--max_shard_size", "300KB",
                   "--max_steps", "2", "--notensorboard")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3, shards  # about 1 MB of fp32 weights in shards of at most 300 KB
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert all(s.stat().st_size < 400_000 for s in shards)
    assert not (out / "model.safetensors").exists() and not list(out.glob("adapter_*"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _shard_tensors(out)
    assert set(index["weight_map"].values()) == {s.name for s in shards} and set(index["weight_map"]) == set(tensors)
    assert {s.name for s in shards} | {"model.safetensors.index.json"} <= set(pipeline(out)["files"])

    tuned, base = _state(out), _state(STORIES)
    assert tuned.keys() == base.keys()
    assert all(torch.equal(tuned[k], v) for k, v in tensors.items())  # what loads is what the shards hold
    changed = [k for k in base if not torch.equal(tuned[k], base[k])]
    assert len(changed) > len(base) // 2, changed  # every weight is trained in a full fine-tune


def test_overwrite_with_shards_leaves_no_stale_weights(tmp_path, prepared):
    out = tmp_path / "full"
    finetune(out, prepared, *flags(), "--method", "full", "--max_steps", "2", "--notensorboard")
    assert (out / "model.safetensors").is_file()  # one file at the default 2GB shard size
    finetune(out, prepared, *flags(lr="1e-2"), "--method", "full", "--max_steps", "2", "--notensorboard",
             "--max_shard_size", "300KB", "--overwrite")
    tensors = _shard_tensors(out)
    assert tensors and pipeline(out)["args"]["max_shard_size"] == "300KB"
    loaded = _state(out)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()), "loads the previous run's weights"
    assert not (out / "model.safetensors").exists()
