"""serve.py under lm-eval 0.4.13: ``local-completions`` scores a multiple-choice task exactly as ``lm_eval --model hf``
does on the same model, with the server's own tokenizer (``/tokenizer_info``, ``/tokenize``); its scoring request
stays right when the model's next token is EOS; ``local-chat-completions`` runs a ``generate_until`` task to the end.

Slow: every ``lm_eval`` call is a separate process that imports torch, transformers and datasets (several seconds
each), and each server loads its model once (one for the module, one for the EOS case); the tasks themselves are
ten questions and three prompts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import DATA, STORIES, read_jsonl
from serving import start_server

pytestmark = pytest.mark.slow

# A model name that is not a path: were lm-eval to fall back to a local tokenizer, loading it would fail offline.
MODEL_NAME = "stories-lmeval"
QUESTIONS, CHOICES, GEN_PROMPTS = 10, 4, 3
GEN_STOP, GEN_TOKENS = ["\n", "."], 12
# The tolerance on a continuation's log-likelihood: fp32 on both sides, the server's batch padded differently.
ATOL = 1e-4


def _offline_env(tmp: Path) -> dict[str, str]:
    # The datasets cache goes under tmp so that the JSONL tasks are read afresh and nothing is left in ~/.cache.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_CACHE": str(tmp / "datasets_cache"), "TOKENIZERS_PARALLELISM": "false"}


def _stories() -> list[list[str]]:
    """The first paragraph of each TinyStories validation story, as words."""
    return [row["text"].split("\n")[0].split() for row in read_jsonl(DATA / "tinystories" / "valid_sample.jsonl")]


def _mc_rows() -> list[dict]:
    """Ten cloze questions from real stories: a story's opening, its next three words and, as distractors, the three
    words at the same place in three other stories. The answer's position cycles through the four slots."""
    stories = [words for words in _stories() if len(words) >= 40]
    rows = []
    for i in range(QUESTIONS):
        cut = 12 + 2 * i
        right = " ".join(stories[i][cut:cut + 3])
        wrong = [" ".join(stories[i + k * QUESTIONS][cut:cut + 3]) for k in range(1, CHOICES)]
        label = i % CHOICES
        choices = wrong[:label] + [right] + wrong[label:]
        assert len(set(choices)) == CHOICES, choices
        rows.append({"context": " ".join(stories[i][:cut]), "choices": choices, "label": label})
    return rows


def _gen_rows() -> list[dict]:
    """Three story openings to continue; the target (the story's own next words) only feeds exact_match."""
    stories = _stories()[100:100 + GEN_PROMPTS]
    return [{"question": "Continue the story: " + " ".join(words[:10]), "answer": " ".join(words[10:14])}
            for words in stories]


def _write_tasks(folder: Path) -> None:
    """Two tasks in ``folder`` for ``--include_path``: ``stories_mc`` (multiple_choice, acc) and ``stories_gen``
    (generate_until with stop strings), each over a JSONL written beside it (``dataset_path: json``)."""
    import yaml

    specs = {
        "stories_mc": (_mc_rows(), {"output_type": "multiple_choice", "doc_to_text": "{{context}}",
                                    "doc_to_choice": "choices", "doc_to_target": "label",
                                    "metric_list": [{"metric": "acc"}]}),
        "stories_gen": (_gen_rows(), {"output_type": "generate_until", "doc_to_text": "{{question}}",
                                      "doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}],
                                      "generation_kwargs": {"until": GEN_STOP, "max_gen_toks": GEN_TOKENS,
                                                            "do_sample": False}}),
    }
    for task, (rows, spec) in specs.items():
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        config = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", **spec}
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lmeval_tasks")
    _write_tasks(folder)
    return folder


def lm_eval(tmp: Path, tasks: Path, task: str, model: str, model_args: str, *extra: str,
            server_log=None) -> tuple[dict, list[dict], str]:
    """Run ``python -m lm_eval`` offline on ``task`` (cwd ``tmp``); returns (results json, samples in doc_id order,
    stderr). On failure the message carries lm_eval's output and the server's stderr."""
    out = tmp / f"out_{model}_{task}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", task,
           "--include_path", str(tasks), "--output_path", str(out), "--log_samples", *extra]
    proc = subprocess.run(cmd, cwd=tmp, env=_offline_env(tmp), capture_output=True, text=True, timeout=300)
    served = f"\nserver stderr:\n{server_log.stderr()[-4000:]}" if server_log else ""
    assert proc.returncode == 0, (f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
                                  + served)
    [results] = out.rglob("results_*.json")
    [samples] = out.rglob(f"samples_{task}_*.jsonl")
    return (json.loads(results.read_text(encoding="utf-8")), sorted(read_jsonl(samples), key=lambda s: s["doc_id"]),
            proc.stderr)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@contextmanager
def _serve(model: Path, log_dir: Path):
    """serve.py on ``model`` (model id MODEL_NAME) until the block ends; yields the running ``serving.Server``."""
    with start_server("--base_model", str(model), "--model_name", MODEL_NAME, log_dir=log_dir) as served:
        yield served


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve.py on stories260K, shared by the module."""
    with _serve(STORIES, tmp_path_factory.mktemp("lmeval_server")) as served:
        yield served


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory, tasks):
    """``lm_eval --model hf`` on stories260K, fp32 on CPU: the reference scores. ``add_bos_token=False`` because
    lm-eval's remote tokenizer always encodes with ``add_special_tokens: false``; both sides then score the same
    token ids."""
    tmp = tmp_path_factory.mktemp("lmeval_hf")
    return lm_eval(tmp, tasks, "stories_mc", "hf", f"pretrained={STORIES},dtype=float32,add_bos_token=False",
                   "--device", "cpu", "--batch_size", "4")


def _choice_scores(samples: list[dict]) -> list[list[tuple[float, bool]]]:
    """Per document, per choice: (log-likelihood, is_greedy) as lm-eval logged them (``filtered_resps``)."""
    return [[(float(ll), str(greedy) == "True") for ll, greedy in s["filtered_resps"]] for s in samples]


def test_local_completions_matches_hf(server, tasks, hf_reference, tmp_path):
    """Each choice's log-likelihood through the server is the hf model's within ``ATOL`` (and its is_greedy flag the
    same), and acc is the same exactly, with no local tokenizer: lm-eval finds /tokenizer_info and tokenizes through
    the server. Batches of 4 prompts of different lengths go in one request, as lm-eval sends them."""
    hf_results, hf_samples, _ = hf_reference
    # max_retries=1: a failing request fails the run at once instead of after lm-eval's back-off.
    results, samples, stderr = lm_eval(
        tmp_path, tasks, "stories_mc", "local-completions",
        f"model={MODEL_NAME},base_url={server.url}/v1/completions,num_concurrent=1,max_retries=1,"
        "tokenized_requests=True", "--batch_size", "4", server_log=server)
    assert "Using remote tokenizer backend" in stderr, stderr[-3000:]
    assert [s["doc_id"] for s in samples] == [s["doc_id"] for s in hf_samples] == list(range(QUESTIONS))
    ours, ref = _choice_scores(samples), _choice_scores(hf_samples)
    # The reference is not degenerate: the choices score apart and the model is sometimes right, sometimes wrong.
    assert all(len({round(ll, 3) for ll, _ in doc}) == CHOICES for doc in ref), ref
    acc, acc_ref = results["results"]["stories_mc"]["acc,none"], hf_results["results"]["stories_mc"]["acc,none"]
    assert 0 < acc_ref < 1
    for doc_id, (got, want) in enumerate(zip(ours, ref, strict=True)):
        assert len(got) == len(want) == CHOICES, (doc_id, got, want)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(got, want, strict=True):
            assert abs(ll - ll_ref) <= ATOL and greedy == greedy_ref, (doc_id, got, want)
    assert [s["acc"] for s in samples] == [s["acc"] for s in hf_samples]
    assert acc == acc_ref


def test_local_chat_completions_generates(server, tasks, tmp_path):
    """``local-chat-completions --apply_chat_template`` runs ``generate_until`` to the end; the samples file holds,
    per prompt, the answer the server gives to the same request sent directly, cut before the stop strings."""
    _, samples, _ = lm_eval(
        tmp_path, tasks, "stories_gen", "local-chat-completions",
        f"model={MODEL_NAME},base_url={server.url}/v1/chat/completions,num_concurrent=1,max_retries=1",
        "--apply_chat_template", server_log=server)
    assert [s["doc_id"] for s in samples] == list(range(GEN_PROMPTS))
    for sample, row in zip(samples, _gen_rows(), strict=True):
        [answer] = sample["filtered_resps"]
        # The body lm-eval sends for this task (one user message, greedy, the task's stop strings and budget).
        direct = _post(f"{server.url}/v1/chat/completions", {
            "messages": [{"role": "user", "content": row["question"]}], "model": MODEL_NAME,
            "max_tokens": GEN_TOKENS, "temperature": 0, "stop": GEN_STOP, "seed": 1234})
        assert answer == direct["choices"][0]["message"]["content"], (sample, direct)
        assert not any(stop in answer for stop in GEN_STOP), answer
    assert any(s["filtered_resps"][0].strip() for s in samples), samples


def _lmeval_pairs(tok, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(context ids, context + continuation ids) per choice, split as lm-eval splits them for a causal model with
    its remote tokenizer (no special tokens; the continuation is what the whole adds after the context)."""
    pairs = []
    for row in rows:
        context = tok(row["context"], add_special_tokens=False)["input_ids"]
        for choice in row["choices"]:
            pairs.append((context, tok(row["context"] + " " + choice, add_special_tokens=False)["input_ids"]))
    return pairs


def _eos_model(folder: Path, prompts: list[list[int]]) -> Path:
    """stories260K with EOS's output row pointed along the mean last hidden state of ``prompts`` and scaled until
    EOS is the likeliest next token after each of them, by 1 nat or more (the real model almost never predicts EOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(STORIES), dtype=torch.float32, local_files_only=True).eval()
    eos = model.config.eos_token_id
    head = model.get_output_embeddings().weight  # tied to the input embeddings: EOS is never an input here
    with torch.no_grad():
        last = torch.stack([model.model(torch.tensor([ids])).last_hidden_state[0, -1] for ids in prompts])
        direction = last.mean(0) / last.mean(0).norm()
        others = (last @ head.T).index_fill(1, torch.tensor([eos]), -torch.inf).max(1).values
        along = last @ direction
        assert bool((along > 0).all())
        head[eos] = direction * float(((others + 1) / along).max())
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True).save_pretrained(str(folder))
    return folder


def test_completions_logprobs_hold_a_final_eos(tmp_path_factory):
    """lm-eval scores a continuation as ``token_logprobs[ctxlen:-1]`` of an echo request with ``max_tokens: 1``, so
    the reply must hold one entry past the prompt even when that next token is EOS, or the continuation loses its
    last token. Sent as lm-eval sends it (4 prompts in one request) and read with lm-eval's own parser, against
    transformers on a stories260K whose next token after each prompt is EOS."""
    import torch
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = tmp_path_factory.mktemp("lmeval_eos")
    tok = AutoTokenizer.from_pretrained(str(STORIES), local_files_only=True)
    pairs = _lmeval_pairs(tok, _mc_rows()[:1])
    folder = _eos_model(tmp / "model", [whole for _, whole in pairs])
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True).eval()
    want = []
    for context, whole in pairs:
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
        assert int(logprobs[-1].argmax()) == model.config.eos_token_id
        scored = logprobs[len(context) - 1:-1]
        target = torch.tensor(whole[len(context):])
        want.append((float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all())))
    with _serve(folder, tmp) as served:
        reply = _post(f"{served.url}/v1/completions", {
            "model": MODEL_NAME, "prompt": [whole for _, whole in pairs], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True})
    for choice, (_, whole) in zip(sorted(reply["choices"], key=lambda c: c["index"]), pairs, strict=True):
        assert len(choice["logprobs"]["token_logprobs"]) == len(whole) + 1, choice
    got = LocalCompletionsAPI.parse_logprobs(outputs=[reply], tokens=[w for _, w in pairs],
                                             ctxlens=[len(c) for c, _ in pairs])
    assert len(got) == len(want)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(got, want, strict=True):
        assert abs(ll - ll_ref) <= ATOL and greedy == greedy_ref, (got, want)
