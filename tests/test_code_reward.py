"""Code reward and its sandbox: real HumanEval problems, hostile programs, every guarantee.

Each hostile program must score 0 within a bounded time and leave no process behind (checked in
/proc by the run's uid and among this process's children); files and connections it attempts are
checked from the outside (the host filesystem, a listening socket). Guarantees that need Linux
namespaces are skipped, with the reason, where the OS does not give them.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from jaxrlhf.tasks import code
from jaxrlhf.tasks import sandbox as sandbox_mod
from jaxrlhf.tasks.sandbox import IsolationUnavailable, Sandbox
from jaxrlhf.tasks.verifiable import pass_at_k_from_scores

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox is Linux-only")

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "real"
TIMEOUT = 4.0  # seconds per hostile program: trivial programs take ~0.1 s
SLACK = 6.0  # launch, kill and reap on 2 busy cores


@pytest.fixture(scope="module")
def humaneval():
    path = REAL / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        pytest.skip(f"HumanEval absent: {REAL} (../shared/real) absent")
    return code.load_rows(path)


@pytest.fixture(scope="module")
def sb():
    return Sandbox(timeout=TIMEOUT, workers=2, memory_bytes=512 << 20)


def needs_namespaces(sb: Sandbox) -> None:
    if sb.isolation != "namespaces":
        pytest.skip(
            "Linux namespaces unavailable here (unprivileged container?): no network/filesystem isolation"
        )


def leftovers(uid: int | None, before: set[int]) -> list:
    """Processes of the run's uid (when it had one) and new children of this test process."""
    procs = [p for p in psutil.process_iter(["uids"]) if uid is not None and p.info["uids"].real == uid]
    procs += [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    return procs


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _row(humaneval, task="HumanEval/0"):
    return next(r for r in humaneval if r["task_id"] == task)


# ---------------------------------------------------------------------------------------------
# Real HumanEval problems
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_canonical_solution_passes_and_return_none_fails(humaneval):
    """All 164 problems, twice: the canonical solution (1.0) and ``return None`` (0.0); one pool."""
    sandbox = Sandbox(timeout=20.0)
    rows = humaneval + humaneval
    responses = [r["canonical_solution"] for r in humaneval] + ["    return None\n"] * len(humaneval)
    scores = code.CodeReward(sandbox)([r["prompt"] for r in rows], responses, rows)
    n = len(humaneval)
    assert n == 164
    failed = [r["task_id"] for r, s in zip(humaneval, scores[:n], strict=True) if s != 1.0]
    assert failed == []
    passed_none = [r["task_id"] for r, s in zip(humaneval, scores[n:], strict=True) if s != 0.0]
    assert passed_none == []


def test_reward_on_real_problems_both_response_styles(humaneval, sb):
    rows = humaneval[:6]
    chat = [
        f"Here you go:\n```python\n{r['prompt']}{r['canonical_solution']}```\nHope it helps." for r in rows
    ]
    body_only = [f"```python\n{r['canonical_solution']}```" for r in rows]
    with_tail = [
        r["canonical_solution"] + "\n\nif __name__ == '__main__':\n    raise SystemExit(1)\n" for r in rows
    ]
    wrong = ["```python\n" + r["prompt"] + "    return None\n```" for r in rows]
    responses = chat + body_only + with_tail + wrong
    out = code.CodeReward(sb)([""] * len(responses), responses, rows * 4)
    assert out.dtype == np.float32 and out.shape == (24,)
    np.testing.assert_array_equal(out, [1.0] * 18 + [0.0] * 6)


def test_pass_at_k_equals_the_closed_form(humaneval, sb):
    """n = 4 samples per problem with c = 0..3 correct; pass@k = 1 - C(n-c, k) / C(n, k)."""
    rows = humaneval[:4]
    samples = [[r["canonical_solution"]] * c + ["    return None\n"] * (4 - c) for c, r in enumerate(rows)]
    scores = code.score_samples(rows, samples, sb)
    np.testing.assert_array_equal(scores.sum(1), [0, 1, 2, 3])
    closed = {k: np.mean([1 - math.comb(4 - c, k) / math.comb(4, k) for c in range(4)]) for k in (1, 2, 4)}
    assert code.pass_at_k(rows, samples, 2, sb) == pytest.approx(closed[2])
    for k in (1, 4):
        assert np.mean(pass_at_k_from_scores(scores, k)) == pytest.approx(closed[k])


def test_reward_contract_errors(humaneval, sb):
    with pytest.raises(ValueError, match="rows"):
        code.CodeReward(sb)(["p"], ["r"], None)
    with pytest.raises(ValueError, match="'test'"):
        code.CodeReward(sb)(["p"], ["r"], [{"prompt": "def f():\n", "entry_point": "f"}])


def test_chat_prompt_rows_through_the_data_pipeline_with_qwen(humaneval, sb, tmp_path):
    """CLI prompt file -> PromptDataset (real Qwen2.5 chat template) -> rows and decoded texts as
    the trainer passes them (``dataset.row(i)``, ``decode(skip_special_tokens=True)``) -> reward."""
    from jaxrlhf import data

    tok_dir = REAL / "tokenizer_qwen2_5_instruct"
    if not tok_dir.exists():
        pytest.skip(f"Qwen2.5 tokenizer absent: {REAL} (../shared/real) absent")
    tok = data.load_tokenizer(str(tok_dir))
    out = tmp_path / "p.jsonl"
    code.main(["prompts", "--input", str(REAL / "humaneval" / "HumanEval.jsonl.gz"), "--output", str(out),
               "--template", "chat"])  # fmt: skip
    cfg = data.default_data_config(path=str(out), max_prompt_length=1024, max_length=2048, max_samples=6)
    ds = data.build_dataset(cfg, tok, "prompt")
    rows = [ds.row(i) for i in range(len(ds))]
    assert len(rows) == 6 and all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
    by_id = {r["task_id"]: r for r in humaneval}
    responses = []
    for i, r in enumerate(rows):
        src = by_id[r["task_id"]]
        answer = f"```python\n{src['prompt']}{src['canonical_solution']}```<|im_end|>"
        if i % 2:  # every other response is wrong
            answer = f"```python\n{src['prompt']}    return None\n```<|im_end|>"
        ids = tok(answer, add_special_tokens=False)["input_ids"]
        responses.append(tok.decode(ids, skip_special_tokens=True))
    prompts = [tok.decode(ds.prompt_ids[i], skip_special_tokens=True) for i in range(len(ds))]
    np.testing.assert_array_equal(code.CodeReward(sb)(prompts, responses, rows), [1.0, 0.0] * 3)


# ---------------------------------------------------------------------------------------------
# Hostile programs
# ---------------------------------------------------------------------------------------------

HOSTILE = {
    "sys_exit_0": "    import sys\n    sys.exit(0)\n",
    "os__exit_0": "    import os\n    os._exit(0)\n",
    "raise_SystemExit": "    raise SystemExit\n",
    "exit_0_at_top_level": "    return 0\nimport os\nos._exit(0)\n",
    "print_success_markers": "    print('PASSED'); print('OK', flush=True)\n    import os\n    os._exit(0)\n",
    "write_fake_tokens_to_every_fd": (
        "    import os\n    for fd in range(3, 256):\n        try:\n            os.write(fd, bytes(16))\n"
        "        except OSError:\n            pass\n    os._exit(0)\n"
    ),
    "infinite_loop": "    while True:\n        pass\n",
    "sleep_forever": "    import time\n    time.sleep(10 ** 6)\n",
    "fork_bomb": "    import os\n    while True:\n        os.fork()\n",
    "memory_bomb": "    x = []\n    while True:\n        x.append(bytearray(1 << 24))\n",
    "kill_the_parent": (
        "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    os.kill(1, signal.SIGKILL)\n"
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_programs_score_zero_in_bounded_time_and_leave_nothing(humaneval, sb, name):
    if name == "fork_bomb" and sb.isolation != "namespaces" and os.geteuid() != 0:
        pytest.skip("without namespaces or a uid of its own, forked children cannot all be found and killed")
    row = _row(humaneval)
    before = children()
    start = time.monotonic()
    (result,) = sb.run_many([code.program(row, HOSTILE[name])])
    elapsed = time.monotonic() - start
    assert not result.passed and result.status in ("failed", "timeout")
    assert elapsed < TIMEOUT + SLACK
    assert leftovers(result.uid, before) == []
    if name in ("infinite_loop", "sleep_forever"):
        assert result.status == "timeout" and result.seconds >= TIMEOUT


def test_a_daemon_that_outlives_the_program_is_killed(humaneval, sb):
    """A correct solution that leaves a detached child sleeping: it scores 1, the child is gone."""
    row = _row(humaneval)
    daemon = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(10 ** 6)\n"
    before = children()
    (result,) = sb.run_many([code.program(row, row["canonical_solution"]) + daemon])
    assert result.passed
    time.sleep(0.2)
    assert leftovers(result.uid, before) == []


def test_no_connection_is_made(humaneval, sb):
    needs_namespaces(sb)
    row = _row(humaneval)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        connect = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        guarded = f"try:\n    {connect.replace(chr(10), chr(10) + '    ')}\nexcept OSError:\n    pass\n"
        solution = code.program(row, row["canonical_solution"])
        hostile, tolerant = sb.run_many([connect + solution, guarded + solution])
        assert not hostile.passed and "OSError" in hostile.stderr
        assert tolerant.passed  # the program ran on: the OS, not the score, stopped the connection
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()


def test_no_file_is_written_outside_the_sandbox(humaneval, sb):
    needs_namespaces(sb)
    row = _row(humaneval)
    # World-writable places (DAC lets any uid write): only the read-only mounts and the private /tmp
    # stop the writes. The test's own directory lives outside /tmp, which the sandbox hides.
    open_dir = Path(
        tempfile.mkdtemp(prefix="jaxrlhf-probe-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    )
    try:
        os.chmod(open_dir, 0o777)
        name = f"jaxrlhf-probe-{secrets.token_hex(4)}"
        targets = [open_dir / "pwned", Path("/tmp") / name]
        targets += [Path("/dev/shm") / name] if os.path.isdir("/dev/shm") else []
        writes = "".join(f"open({str(t)!r}, 'w').write('x')\n" for t in targets)
        guarded = "".join(
            f"try:\n    {w}except OSError:\n    pass\n" for w in writes.splitlines(keepends=True)
        )
        solution = code.program(row, row["canonical_solution"])
        hostile, tolerant = sb.run_many([writes + solution, guarded + solution])
        assert not hostile.passed and tolerant.passed
        assert [t for t in targets if t.exists()] == []
    finally:
        for t in targets:
            t.unlink(missing_ok=True)
        open_dir.rmdir()


def test_environment_stdin_cwd_uid_and_limits(sb, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXRLHF_PROBE_SECRET", "leaked")
    # this test's own temp root: another xdist worker's sandboxes must not count as leftovers
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    limits = {"RLIMIT_AS": 512 << 20, "RLIMIT_NPROC": None, "RLIMIT_FSIZE": 16 << 20, "RLIMIT_NOFILE": 64}
    probe = f"""
import os, resource, sys
assert "JAXRLHF_PROBE_SECRET" not in os.environ, sorted(os.environ)
assert set(os.environ) <= {{"LC_CTYPE"}}, sorted(os.environ)  # Python's own C-locale coercion
assert sys.stdin.read() == ""
assert os.listdir(".") == []
open("scratch", "w").write("x" * 1000)
assert os.path.getsize("scratch") == 1000
for name, value in {limits!r}.items():
    soft, hard = resource.getrlimit(getattr(resource, name))
    assert soft == hard and (value is None or soft == value), (name, soft, value)
assert resource.getrlimit(resource.RLIMIT_CPU)[0] == {math.ceil(TIMEOUT) + 1}
assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
if {os.geteuid() == 0}:
    assert os.getuid() != 0 and os.geteuid() != 0 and os.getgroups() in ([], [os.getgid()])
"""
    before = set(Path(tempfile.gettempdir()).glob("jaxrlhf-sandbox-*"))
    (result,) = sb.run_many([probe])
    assert result.passed, result.stderr
    assert set(Path(tempfile.gettempdir()).glob("jaxrlhf-sandbox-*")) <= before  # temp dirs removed


def test_file_size_limit(sb):
    (result,) = sb.run_many(["open('big', 'wb').write(bytes(32 << 20))\n"])
    assert not result.passed


def test_require_isolation_refuses_to_run_without_namespaces():
    strict = Sandbox(timeout=TIMEOUT, isolate=False, require_isolation=True)
    with pytest.raises(IsolationUnavailable, match="require_isolation"):
        strict.run("pass")
    assert Sandbox(timeout=TIMEOUT, isolate=False).run("pass").passed  # the same level, allowed


def test_require_isolation_runs_where_namespaces_exist(sb):
    needs_namespaces(sb)
    assert Sandbox(timeout=TIMEOUT, require_isolation=True).run("x = 1").passed


def test_isolation_level_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox_mod, "_ISOLATION", {})
    with caplog.at_level(logging.INFO, logger="jaxrlhf.sandbox"):
        for _ in range(2):
            s = Sandbox(timeout=TIMEOUT)
            assert s.isolation in sandbox_mod.ISOLATION_LEVELS
            s.run("pass")
    assert sum("sandbox isolation" in r.getMessage() for r in caplog.records) == 1


def test_threat_model_limit_a_program_reading_the_harness_memory_can_forge_a_pass(sb):
    """Documented limit (docs/rewards.md): the token is written by the harness in the program's own
    interpreter, so code that deliberately reads it from the harness's frame can forge a pass."""
    forge = (
        "import os, sys\nf = sys._getframe()\nwhile 'token' not in f.f_locals:\n    f = f.f_back\n"
        "os.write(f.f_locals['result_fd'], f.f_locals['token'])\nos._exit(0)\n"
    )
    assert sb.run(forge).passed


def test_config_builds():
    path = ROOT / "configs" / "ppo_humaneval_qwen.py"
    spec = importlib.util.spec_from_file_location("ppo_humaneval_qwen", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert c.algorithm == "ppo" and c.reward.fn == "jaxrlhf.tasks.code:reward"
    module, name = c.reward.fn.split(":")
    assert getattr(importlib.import_module(module), name) is code.reward
