"""Property-based fuzzing of ``serve.py``'s HTTP API with schemathesis, against the running server's own OpenAPI.

Schemathesis generates requests from ``/openapi.json`` (valid ones and, in negative mode, ones that break the
schema), sends them to a real server on stories260K and checks every answer: no 5xx (``not_a_server_error``)
and each response matching the schema documented for its status (``response_schema_conformance``). The
server runs with small bounds (a 48-token context, ``n`` <= 2) so that an accepted generation request costs a
few decoding steps.

The request side of the schema is narrowed before the run, in two places only: ``model`` to the ids the server
serves (or null) and a chat message's ``role`` to the roles it renders. Left free-form, nearly every generated
request stops at the 404 / 400 for an unknown model or role and never reaches the template, the tokenizer or
the engine; negative mode still sends other models and roles. Response schemas are used as served.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import REPO, STORIES
from serving import metrics, offline_env, start_server

EXAMPLES = 200  # per operation (hypothesis' max_examples), in each run of the fuzzing phase
SEED = 20240601  # fixed: a failure reproduces on the next run (`st replay` or the printed curl line)
# Operations split over parallel schemathesis processes (the server batches their requests together).
GROUPS = (r"^/v1/chat/completions$", r"^/v1/completions$",
          r"^/(tokenize|detokenize|health|metrics|v1/models|tokenizer_info)?$")
SCHEMATHESIS = Path(REPO) / ".venv" / "bin" / "schemathesis"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A small-bounded server: 48-token context, at most 2 choices, ChatML (a short multi-turn template)."""
    with start_server("--base_model", STORIES, "--max_model_len", "48", "--max_n", "2", "--max_batch_size", "4",
                      "--max_queue", "16", "--prompt_template", "chatml",
                      log_dir=tmp_path_factory.mktemp("fuzz_server")) as s:
        yield s


def narrowed_schema(url: str) -> dict:
    """The server's ``/openapi.json`` with ``model`` limited to the served ids and ``role`` to the rendered roles."""
    from utils.serving.protocol import ROLES

    schema = httpx.get(url + "/openapi.json", timeout=30).json()
    served = [m["id"] for m in httpx.get(url + "/v1/models", timeout=30).json()["data"]]
    components = schema["components"]["schemas"]
    for body in components.values():
        props = body.get("properties", {})
        if "model" in props:
            props["model"] = {"anyOf": [{"enum": served}, {"type": "null"}]}
    components["ChatMessage"]["properties"]["role"] = {"enum": sorted(ROLES)}
    return schema


def run_schemathesis(schema_file: Path, url: str, out: Path) -> list[tuple[subprocess.CompletedProcess, Path]]:
    """One schemathesis process per group of operations, run at the same time; (result, report folder) each."""
    procs = []
    for i, group in enumerate(GROUPS):
        reports = out / f"group{i}"
        cmd = [str(SCHEMATHESIS), "run", str(schema_file), "--url", url, "--include-path-regex", group,
               "--checks", "not_a_server_error,response_schema_conformance", "--mode", "all",
               "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1", "--continue-on-failure",
               "--generation-database", "none", "--request-timeout", "120", "--no-color", "--output-sanitize",
               "false", "--report", "json,har", "--report-dir", str(reports)]
        procs.append((subprocess.Popen(cmd, cwd=out, env=offline_env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), reports))
    results = []
    for proc, reports in procs:
        stdout, _ = proc.communicate(timeout=900)
        results.append((subprocess.CompletedProcess(proc.args, proc.returncode, stdout), reports))
    return results


def _report(folder: Path, kind: str) -> dict:
    files = sorted(folder.glob(f"{kind}-*.json"))
    assert files, f"schemathesis wrote no {kind} report in {folder}"
    return json.loads(files[-1].read_text(encoding="utf-8"))


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_or_schema_violation(server, tmp_path):
    """Slow (about a minute on 2 cores, up to a few on a busy machine): schemathesis' coverage and fuzzing phases
    send over 200 generated requests to each POST operation, and the accepted ones decode on the CPU; fewer
    examples would leave the request space of chat and completions (a dozen interacting fields each) barely
    sampled."""
    schema = narrowed_schema(server.url)
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(schema), encoding="utf-8")
    before = metrics(server.url)  # counts the 503s of /health while the model loaded
    results = run_schemathesis(schema_file, server.url, tmp_path)

    sent: collections.Counter = collections.Counter()
    statuses: collections.Counter = collections.Counter()
    problems = []
    for result, reports in results:
        summary = _report(reports, "json")
        if summary["failures"] or summary["errors"] or not summary["complete"]:
            # The report from its FAILURES / ERRORS section on (each with the request that reproduces it).
            found = re.search(r"^=+ (FAILURES|ERRORS) =+$", result.stdout, re.M)
            problems.append(result.stdout[found.start():] if found else result.stdout)
        for entry in _report(reports, "har")["log"]["entries"]:
            key = (entry["request"]["method"], urlsplit(entry["request"]["url"]).path)
            sent[key] += 1
            statuses[entry["response"]["status"]] += 1
    assert not problems, "schemathesis found failures:\n" + "\n\n".join(problems)
    # Each POST operation was sent at least EXAMPLES requests (GET ones take no input: a handful covers them).
    posts = {path: sent["POST", path] for path, ops in schema["paths"].items() if "post" in ops}
    assert len(posts) >= 5 and all(n >= EXAMPLES for n in posts.values()), f"too few requests: {posts}"
    assert statuses[200] > 0 and statuses[400] > 0, statuses  # both accepted and refused requests were made

    # The server's own account agrees: it answered no 5xx during the run, and it is still up.
    after = metrics(server.url)
    server_errors = {k: after[k] - before.get(k, 0) for k in after if k.startswith('serve_responses_total{code="5')}
    assert not any(server_errors.values()), server_errors
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
