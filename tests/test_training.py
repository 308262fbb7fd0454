"""finetune.py's training features: packing, data parallel, FSDP and DeepSpeed under torchrun, gradient
checkpointing, early stopping and keep-best, TensorBoard and wandb, sharded full saves.

Each "same result" test compares against a plain single-process run with LoRA dropout off, so the
only differences left are floating-point summation order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REAL_SETS, REPO, STORIES
from utils.batches import collate, collate_packed, pack
from utils.cli import SuiteError, run

BASE_FLAGS = ["--batch_size", "8", "--micro_batch_size", "2", "--lora_dropout", "0", "--learning_rate", "3e-3",
              "--logging_steps", "0", "--seed", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    import prepare_data

    root = tmp_path_factory.mktemp("tr")
    rows = json.loads(Path(REAL_SETS["alpaca"]).read_text(encoding="utf-8"))[:120]
    src = root / "gsm.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    out = root / "prepared"
    run(prepare_data.main, ["--base_model", str(STORIES), "--data_path", str(src), "--output_dir", str(out),
                            "--cutoff_len", "320", "--val_set_size", "16"])
    return out


def _flags(extra) -> list[str]:
    """BASE_FLAGS, less those that ``extra`` sets itself, then ``extra``."""
    pairs = [BASE_FLAGS[i:i + 2] for i in range(0, len(BASE_FLAGS), 2)]
    return [x for flag, value in pairs if flag not in extra for x in (flag, value)] + list(extra)


def _finetune(out: Path, data: Path, *extra: str) -> None:
    import finetune as ft

    run(ft.main, ["--base_model", str(STORIES), "--data_path", str(data), "--output_dir", str(out), *_flags(extra)])


def _cmd(out: Path, data: Path, *extra: str) -> list[str]:
    return ["finetune.py", "--base_model", str(STORIES), "--data_path", str(data), "--output_dir", str(out),
            *_flags(extra)]


def _metrics(out: Path) -> tuple[list[float], list[dict]]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


def _assert_same_run(a: Path, b: Path, rtol: float = 1e-4) -> None:
    from safetensors.torch import load_file

    (la, ea), (lb, eb) = _metrics(a), _metrics(b)
    assert len(la) == len(lb) and la == pytest.approx(lb, rel=rtol)
    assert ea[-1]["eval_loss"] == pytest.approx(eb[-1]["eval_loss"], rel=rtol)
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3)


# -- packing ---------------------------------------------------------------------------------------

def _tiny(kind: str):
    from transformers import GlmConfig, GPT2Config, LlamaConfig, Qwen2Config
    from transformers import AutoModelForCausalLM

    common = dict(vocab_size=300, pad_token_id=0)
    config = {
        "llama": lambda: LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, **common),
        "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, **common),
        "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2, **common),
        "glm": lambda: GlmConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, **common),
    }[kind]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()  # eval: GPT-2 has dropout


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2", "glm"])
def test_packed_loss_equals_unpacked_loss(kind):
    import finetune as ft
    from utils.model import check_packing

    model = _tiny(kind)
    check_packing(model)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for n in (11, 4, 9, 15, 6, 3):
        ids = torch.randint(3, 300, (n,), generator=gen).tolist()
        rows.append((ids, [-100] * (n // 2) + ids[n // 2:]))
    lengths = [len(ids) for ids, _ in rows]
    bins = pack(list(range(len(rows))), lengths, 16)
    assert len(bins) < len(rows) and any(sum(lengths[i] for i in b) < 16 for b in bins)  # shared rows, a pad tail
    with torch.no_grad():
        unpacked = ft.token_loss_sum(model, collate(rows, 0), 0)
        packed = sum(ft.token_loss_sum(model, collate_packed([[rows[i] for i in b] for b in bins[j:j + 2]], 0), 0)
                     for j in range(0, len(bins), 2))
        leaky = ft.token_loss_sum(model, {**collate([(sum((rows[i][0] for i in b), []),
                                                      sum((rows[i][1] for i in b), [])) for b in bins], 0)}, 0)
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-4)
    # Concatenating without the position reset (what naive packing does) changes the loss: the test can fail.
    assert abs(float(leaky) - float(unpacked)) > 1e-3


def test_pack_fills_bins_without_overflow_or_loss():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.integers(1, 64), min_size=1, max_size=60), st.integers(64, 200))
    def check(lengths, capacity):
        bins = pack(list(range(len(lengths))), lengths, capacity)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
        # First fit never leaves two bins at most half full (their contents would have shared one).
        assert sum(2 * sum(lengths[i] for i in b) <= capacity for b in bins) <= 1

    check()


def test_check_packing_refuses_a_leaky_architecture():
    from types import SimpleNamespace

    from utils.model import check_packing

    class Leaky(torch.nn.Module):
        """Logits from a running sum over the whole row: every position sees all earlier ones."""

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, position_ids=None, use_cache=False, **kw):
            return SimpleNamespace(logits=self.emb(input_ids).cumsum(1))

    with pytest.raises(SuiteError, match="--packing"):
        check_packing(Leaky())


def test_packing_run_matches_unpacked_run(tmp_path, prepared):
    _finetune(tmp_path / "plain", prepared, "--max_steps", "3")
    _finetune(tmp_path / "packed", prepared, "--max_steps", "3", "--packing")
    _assert_same_run(tmp_path / "plain", tmp_path / "packed")


def test_packing_with_virtual_tokens_is_refused(tmp_path, prepared, capsys):
    with pytest.raises(SystemExit) as exc:
        _finetune(tmp_path / "p", prepared, "--method", "prefix", "--packing")
    assert exc.value.code == 2 and "--packing works with lora, qlora and full" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_gradient_checkpointing_gives_the_same_run(tmp_path, prepared):
    _finetune(tmp_path / "plain", prepared, "--max_steps", "3")
    _finetune(tmp_path / "ckpt", prepared, "--max_steps", "3", "--gradient_checkpointing")
    _assert_same_run(tmp_path / "plain", tmp_path / "ckpt", rtol=1e-5)


# -- several processes -----------------------------------------------------------------------------

def _torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


NO_DEEPSPEED = pytest.mark.skipif(not _has_deepspeed(), reason="deepspeed is not installed (optional)")


@pytest.mark.parametrize("extra", [
    [], ["--fsdp"],
    pytest.param(["--deepspeed", str(REPO / "examples/deepspeed_zero2.json")], marks=NO_DEEPSPEED),
    pytest.param(["--deepspeed", str(REPO / "examples/deepspeed_zero3.json")], marks=NO_DEEPSPEED),
], ids=["ddp", "fsdp", "zero2", "zero3"])
def test_two_processes_match_one(tmp_path, prepared, extra):
    one = tmp_path / "one"
    _finetune(one, prepared, "--max_steps", "3", "--save_steps", "2")
    two = tmp_path / "two"
    proc = _torchrun(2, _cmd(two, prepared, "--max_steps", "3", "--save_steps", "2", *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(two.absolute())  # one payload line, from rank 0 only
    assert proc.stderr.count("resolved arguments") == 1
    _assert_same_run(one, two)
    meta = json.loads((two / "pipeline.json").read_text())
    assert meta["world_size"] == 2 and meta["complete"]

    # Interrupted after its checkpoint (simulated: the finished outputs removed), the job resumes
    # from checkpoint-2 with two processes and ends where it ended before.
    for name in ("pipeline.json", "adapter_model.safetensors"):
        (two / name).unlink()
    before = (two / "metrics.jsonl").read_text()
    proc = _torchrun(2, _cmd(two, prepared, "--max_steps", "3", "--save_steps", "2", "--resume_from_checkpoint", "auto",
                             *extra))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and (two / "metrics.jsonl").read_text() == before


def test_batch_must_divide_over_processes(tmp_path, prepared, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        import finetune as ft

        run(ft.main, ["--base_model", str(STORIES), "--data_path", str(prepared), "--output_dir", str(tmp_path / "x"),
                      "--batch_size", "6", "--micro_batch_size", "2", "--max_steps", "1"])
    assert exc.value.code == 2
    assert "--batch_size 6 must be a multiple of --micro_batch_size 2 x 2 processes" in capsys.readouterr().err


def test_deepspeed_flag_is_checked_up_front(tmp_path, prepared, capsys):
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exc:
        _finetune(tmp_path / "x", prepared, "--deepspeed", str(bad), "--fsdp")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--deepspeed {bad}: not a readable JSON config" in err
    assert "--deepspeed cannot be combined with --fsdp" in err
    if not _has_deepspeed():
        assert "--deepspeed needs the deepspeed package" in err


def test_fsdp_needs_several_processes(tmp_path, prepared, capsys):
    with pytest.raises(SystemExit) as exc:
        _finetune(tmp_path / "x", prepared, "--fsdp")
    assert exc.value.code == 2 and "--fsdp needs torchrun with 2 or more processes" in capsys.readouterr().err


# -- evaluation, early stopping, keep-best ----------------------------------------------------------

def test_early_stopping_and_keep_best(tmp_path, prepared):
    from safetensors.torch import load_file

    # A learning rate far too high: the eval loss rises after a while and training stops early.
    flags = ["--learning_rate", "0.3", "--micro_batch_size", "4", "--seed", "42", "--eval_steps", "2",
             "--early_stopping_patience", "1", "--max_steps", "16",
             "--save_steps", "2", "--save_total_limit", "10"]
    best = tmp_path / "best"
    _finetune(best, prepared, *flags, "--load_best_model_at_end")
    meta = json.loads((best / "pipeline.json").read_text())
    _, evals = _metrics(best)
    periodic = [e for e in evals if not e.get("final")]
    assert meta["stopped_early"] and meta["steps"] < 16 and meta["steps"] == periodic[-1]["step"]
    lowest = min(periodic, key=lambda e: e["eval_loss"])
    assert meta["best"] == {"step": lowest["step"], "eval_loss": lowest["eval_loss"]}
    assert lowest is not periodic[-1]  # the last weights are not the best ones ...
    assert meta["final_eval"]["eval_loss"] == lowest["eval_loss"]  # ... and the best ones were written
    # Checkpoints carry the best weights and the patience count, so a resumed run keeps them.
    state = json.loads((best / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["best"] == {"step": 2, "eval_loss": periodic[0]["eval_loss"]} and state["bad_evals"] == 0
    assert load_file(str(best / "checkpoint-2" / "best.safetensors"))

    last = tmp_path / "last"
    _finetune(last, prepared, *flags)
    meta = json.loads((last / "pipeline.json").read_text())
    _, evals = _metrics(last)
    assert meta["stopped_early"] and meta["final_eval"]["eval_loss"] == evals[-2]["eval_loss"] != lowest["eval_loss"]


def test_early_stopping_needs_evaluations(tmp_path, prepared, capsys):
    with pytest.raises(SystemExit) as exc:
        _finetune(tmp_path / "x", prepared, "--early_stopping_patience", "2")
    assert exc.value.code == 2 and "need --eval_steps" in capsys.readouterr().err


# -- metrics sinks ---------------------------------------------------------------------------------

def test_tensorboard_events_match_metrics(tmp_path, prepared):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    _finetune(out, prepared, "--max_steps", "4", "--eval_steps", "2")
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    losses, evals = _metrics(out)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [e.value for e in acc.Scalars("eval/loss")] == pytest.approx([e["eval_loss"] for e in evals], rel=1e-6)

    quiet = tmp_path / "quiet"
    _finetune(quiet, prepared, "--max_steps", "1", "--notensorboard")
    assert not (quiet / "tensorboard").exists()


FAKE_WANDB = r'''
import json, os
_log = {"init": None, "log": [], "watch": [], "artifacts": [], "finished": False}
def _save():
    with open(os.environ["FAKE_WANDB_LOG"], "w") as f:
        json.dump(_log, f)
class _Run:
    id = "abc123"
    def log(self, data, step=None):
        _log["log"].append([data, step]); _save()
    def log_artifact(self, artifact):
        _log["artifacts"].append([artifact.name, artifact.files]); _save()
    def finish(self):
        _log["finished"] = True; _save()
class Artifact:
    def __init__(self, name, type):
        self.name, self.files = name, []
    def add_file(self, path):
        self.files.append(os.path.basename(path))
def init(**kwargs):
    _log["init"] = {k: v for k, v in kwargs.items() if k != "config"}; _save()
    return _Run()
def watch(model, log=None):
    _log["watch"].append(log); _save()
'''


def test_wandb_logging_through_its_api(tmp_path, prepared):
    fake = tmp_path / "site"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    record = tmp_path / "wandb.json"
    out = tmp_path / "w"
    env = {**ENV, "PYTHONPATH": str(fake), "FAKE_WANDB_LOG": str(record)}
    proc = subprocess.run([sys.executable, *_cmd(out, prepared, "--max_steps", "3", "--wandb_project", "proj",
                                                 "--wandb_run_name", "r1", "--wandb_watch", "gradients",
                                                 "--wandb_log_model")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads(record.read_text())
    assert log["init"]["project"] == "proj" and log["init"]["name"] == "r1"
    assert [step for data, step in log["log"] if "train/loss" in data] == [1, 2, 3]
    assert log["watch"] == ["gradients"] and log["finished"]
    assert any("adapter_model.safetensors" in files for _, files in log["artifacts"])


def test_wandb_flags_without_wandb_stop_before_work(tmp_path, prepared):
    pytest.importorskip  # the real package is not a dependency of the suite
    proc = subprocess.run([sys.executable, *_cmd(tmp_path / "w", prepared, "--wandb_project", "p")], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    assert proc.returncode == 2 and "--wandb_project needs the wandb package" in proc.stderr
    assert not (tmp_path / "w").exists()


# -- full fine-tune output -------------------------------------------------------------------------

def test_full_finetune_is_saved_in_shards(tmp_path, prepared):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    _finetune(out, prepared, "--method", "full", "--max_steps", "2", "--max_shard_size", "300KB",
              "--learning_rate", "1e-3")
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) >= 3 and set(index["weight_map"].values()) == {p.name for p in shards}
    tuned = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(STORIES))
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) > len(list(base.parameters())) // 2
    assert sum(len(load_file(str(p))) for p in shards) == len(index["weight_map"])
