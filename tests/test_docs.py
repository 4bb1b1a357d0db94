"""Every code block of the READMEs and docs/*.md runs in the test suite: a snippet that fails is red.

Files: ``README.md``, every ``*/README.md`` and ``engine/**/README.md``, and ``docs/*.md``.

Blocks (fenced, with a language tag; an untagged block fails the suite):

* ```python``` -- the python blocks of one file run in order, in one namespace, in one
  subprocess whose working directory is a fresh temp dir (``../shared/data`` is linked next to it
  when the repository's shared photos exist);
* ```sh``` / ```bash``` / ```console``` -- each command (one line; a trailing ``\\`` continues it; in
  ``console`` blocks only the ``$ `` lines) runs with ``bash`` in the same temp dir, with this
  venv's ``veilface`` and ``python`` first on PATH, and must exit 0;
* ```toml``` / ```json``` -- parsed; ```text``` / ```proto``` -- not code (diagrams, output,
  excerpts), not run.

Blocks of all languages run in document order (a python block can start a server or write a file
that a later ``sh`` block uses). A failure names the file and line of the block (python
tracebacks point into the markdown file itself).

Markers: an HTML comment right before a block (only blank lines in between); GitHub hides them.

* ``<!-- docs-test: skip: REASON -->`` -- the block is not run; every ``make test`` lists it with
  REASON in the skip summary. Keep these rare: a block that installs (``make demo``), or one that
  starts a server that never returns.
* ``<!-- docs-test: needs: PATH -->`` -- run only when PATH exists (relative to the working dir,
  e.g. ``../shared/data/faces``); otherwise skipped and listed like ``skip``.
* ``<!-- docs-test: setup`` ... ``-->`` -- hidden python code (the comment's body) run just before
  the next block, in the same namespace: synthetic embeddings, a photo, a test server. Keep what a
  reader needs to understand the snippet visible; hide only what a reader already has.

Several markers may precede one block. The same rules are in ``docs/contributing.md``.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"sh", "bash", "shell", "console"}
PARSED_LANGS = {"toml", "json"}
INERT_LANGS = {"text", "proto"}
BLOCK_TIMEOUT_S = 240       # one block or one command
FILE_TIMEOUT_S = 900        # all blocks of one file

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*(?P<end>-->)?\s*$")


@dataclass
class Block:
    path: str                # relative to the repository root
    line: int                # 1-based line of the first code line (the one after the fence)
    lang: str
    code: str
    skip: str | None = None  # reason
    needs: list[str] = field(default_factory=list)
    setup: list[tuple[int, str]] = field(default_factory=list)  # (first line, hidden python code)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


class DocError(Exception):
    """A malformed block or marker (untagged block, unknown language or marker, dangling marker)."""


def doc_files(root: Path = ROOT) -> list[Path]:
    files = {root / "README.md", *root.glob("*/README.md"), *root.glob("engine/**/README.md"), *root.glob("docs/*.md")}
    return sorted(p for p in files if p.is_file()
                  and not any(part.startswith(".") or part in ("build", "dist") for part in p.relative_to(root).parts))


def parse(path: Path, root: Path = ROOT) -> list[Block]:
    """The fenced blocks of ``path`` with their markers; raises :class:`DocError` listing every problem."""
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    errors: list[str] = []
    pending: dict = {"skip": None, "needs": [], "setup": [], "line": None}
    i = 0
    while i < len(lines):
        text = lines[i]
        m = _MARKER.match(text)
        if m:
            start = i + 1
            body = m.group("body")
            key, _, arg = body.partition(":") if not body.startswith("setup") else ("setup", "", "")
            key, arg = key.strip(), arg.strip()
            if key == "setup":
                code_lines = []
                if not m.group("end"):
                    i += 1
                    while i < len(lines) and lines[i].strip() != "-->":
                        code_lines.append(lines[i])
                        i += 1
                    if i == len(lines):
                        errors.append(f"{rel}:{start}: unterminated docs-test setup comment (end it with a line '-->')")
                pending["setup"].append((start + 1, "\n".join(code_lines)))
            elif key == "skip" and arg and m.group("end"):
                pending["skip"] = arg
            elif key == "needs" and arg and m.group("end"):
                pending["needs"].append(arg)
            else:
                errors.append(f"{rel}:{start}: unknown docs-test marker {body!r} "
                              "(use 'skip: REASON', 'needs: PATH' or a 'setup' comment)")
            pending["line"] = pending["line"] or start
            i += 1
            continue
        f = _FENCE.match(text)
        if f:
            indent, fence, info = f.group("indent"), f.group("fence"), f.group("info").strip()
            lang = info.split()[0].lower() if info else ""
            fence_line = i + 1
            body_lines = []
            i += 1
            while i < len(lines):
                close = lines[i].strip()
                if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                    break
                line = lines[i]
                body_lines.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
                i += 1
            start = fence_line + 1
            if not lang:
                errors.append(f"{rel}:{fence_line}: code block without a language: tag it (```python, ```sh, ...; "
                              "```text for diagrams and output)")
            elif lang not in PYTHON_LANGS | SHELL_LANGS | PARSED_LANGS | INERT_LANGS:
                errors.append(f"{rel}:{fence_line}: code block language {lang!r} is not one the docs test knows: "
                              f"{sorted(PYTHON_LANGS | SHELL_LANGS | PARSED_LANGS | INERT_LANGS)}")
            blocks.append(Block(rel, start, lang, "\n".join(body_lines) + "\n", pending["skip"],
                                list(pending["needs"]), list(pending["setup"])))
            pending = {"skip": None, "needs": [], "setup": [], "line": None}
            i += 1
            continue
        if text.strip() and pending["line"] is not None:
            errors.append(f"{rel}:{pending['line']}: docs-test marker not followed by a code block")
            pending = {"skip": None, "needs": [], "setup": [], "line": None}
        i += 1
    if pending["line"] is not None:
        errors.append(f"{rel}:{pending['line']}: docs-test marker not followed by a code block")
    if errors:
        raise DocError("\n".join(errors))
    return blocks


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """``(line, command)`` for each command of a sh/console block (continuations joined)."""
    out: list[tuple[int, str]] = []
    current: list[str] = []
    first = 0
    for k, raw in enumerate(block.code.splitlines()):
        line = raw.rstrip()
        if not current:
            if block.lang == "console":
                if not line.startswith("$ "):
                    continue  # output shown in the docs
                line = line[2:]
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            first = block.line + k
        if line.endswith("\\"):
            current.append(line[:-1])
            continue
        current.append(line)
        out.append((first, " ".join(s.strip() for s in current)))
        current = []
    if current:
        out.append((first, " ".join(s.strip() for s in current)))
    return out


# -- the driver (runs in a subprocess, one per markdown file) -----------------------------------------
class _BlockTimeout(Exception):
    pass


def _on_alarm(signum, frame):  # noqa: ARG001
    raise _BlockTimeout(f"block still running after {BLOCK_TIMEOUT_S} s")


def _driver(plan_path: str) -> int:
    plan = json.loads(Path(plan_path).read_text())
    progress = Path(plan["progress"])
    root = Path(plan["root"])
    ns: dict = {"__name__": "__docs__"}
    signal.signal(signal.SIGALRM, _on_alarm)

    def note(msg: str) -> None:
        with progress.open("a") as fh:
            fh.write(msg + "\n")

    def run_python(path: str, line: int, code: str, what: str) -> bool:
        note(f"start {path}:{line} {what}")
        compiled = compile("\n" * (line - 1) + code, str(root / path), "exec")
        signal.alarm(BLOCK_TIMEOUT_S)
        try:
            exec(compiled, ns)  # noqa: S102 - running the documentation is the point
        except BaseException:  # noqa: BLE001
            traceback.print_exc()
            print(f"\ndocs-test FAILED: {path}:{line} ({what})", flush=True)
            return False
        finally:
            signal.alarm(0)
        sys.stdout.flush()
        sys.stderr.flush()
        return True

    for b in plan["blocks"]:
        for sline, scode in b["setup"]:
            if not run_python(b["path"], sline, scode, "hidden setup"):
                return 1
        if b["lang"] in PYTHON_LANGS:
            if not run_python(b["path"], b["line"], b["code"], "python block"):
                return 1
        elif b["lang"] in SHELL_LANGS:
            for line, cmd in shell_commands(Block(**b)):
                note(f"start {b['path']}:{line} $ {cmd}")
                print(f"$ {cmd}", flush=True)
                try:
                    r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT_S)
                except subprocess.TimeoutExpired as exc:
                    print((exc.output or "")[-4000:] if isinstance(exc.output, str) else "")
                    print(f"\ndocs-test FAILED: {b['path']}:{line}: still running after {BLOCK_TIMEOUT_S} s: {cmd}")
                    return 1
                print(r.stdout[-4000:], flush=True)
                if r.returncode != 0:
                    print(f"\ndocs-test FAILED: {b['path']}:{line}: exit {r.returncode}: {cmd}", flush=True)
                    return 1
        elif b["lang"] == "toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            try:
                tomllib.loads(b["code"])
            except tomllib.TOMLDecodeError as exc:
                print(f"docs-test FAILED: {b['path']}:{b['line']}: TOML does not parse: {exc}")
                return 1
        elif b["lang"] == "json":
            try:
                json.loads(b["code"])
            except json.JSONDecodeError as exc:
                print(f"docs-test FAILED: {b['path']}:{b['line'] + exc.lineno - 1}: JSON does not parse: {exc}")
                return 1
        note(f"ok {b['path']}:{b['line']}")
    return 0


# -- running a file -------------------------------------------------------------------------------
def runnable(blocks: list[Block], workdir: Path) -> tuple[list[Block], list[tuple[Block, str]]]:
    """Split into blocks to run and ``(block, reason)`` skipped ones."""
    run, skipped = [], []
    for b in blocks:
        if b.lang in INERT_LANGS:
            continue
        reason = skip_reason(b, workdir)
        if reason:
            skipped.append((b, reason))
        else:
            run.append(b)
    return run, skipped


def skip_reason(block: Block, workdir: Path | None = None) -> str | None:
    """Why ``block`` is not run (its skip marker, or a ``needs`` path that is absent), else None.
    Without ``workdir`` (at collection) only ``../shared/...`` needs can be checked."""
    if block.skip:
        return block.skip
    if workdir is None:
        missing = [n for n in block.needs if n.startswith("../shared/") and not (SHARED / n[len("../shared/"):]).exists()]
    else:
        missing = [n for n in block.needs if not (workdir / n).exists()]
    return f"needs {', '.join(missing)}, which is not here" if missing else None


def prepare_workdir(base: Path) -> Path:
    """``base/work`` (the working dir) with ``base/shared`` -> the repository's shared data."""
    work = base / "work"
    work.mkdir(parents=True, exist_ok=True)
    if SHARED.is_dir() and not (base / "shared").exists():
        (base / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    return work


def run_blocks(blocks: list[Block], workdir: Path, root: Path = ROOT, env: dict | None = None,
               timeout: float = FILE_TIMEOUT_S) -> tuple[int, str]:
    """Run ``blocks`` through the driver in a subprocess (its own session: whatever it starts
    is killed afterwards). Returns (exit code, output)."""
    plan = workdir.parent / f"plan-{os.getpid()}-{time.monotonic_ns()}.json"
    progress = plan.with_suffix(".progress")
    plan.write_text(json.dumps({"root": str(root), "progress": str(progress), "blocks": [asdict(b) for b in blocks]}))
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, **(env or {})}
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("VIRTUAL_ENV", None)
    log = plan.with_suffix(".log")
    with log.open("w") as out_fh:  # a file, not a pipe: a process a block leaves behind may hold it open
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--driver", str(plan)], cwd=workdir,
                                env=env, stdout=out_fh, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            tail = ""
        except subprocess.TimeoutExpired:
            last = progress.read_text().splitlines()[-1] if progress.exists() else "(nothing started)"
            tail = f"\ndocs-test FAILED: still running after {timeout:.0f} s; last step: {last}"
            code = -1
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # servers or helpers a block left behind
            except ProcessLookupError:
                pass
            proc.wait()
    out = log.read_text(errors="replace") + tail
    return code, out


# -- the tests ------------------------------------------------------------------------------------
def _all_blocks() -> dict[str, list[Block]]:
    out = {}
    for p in doc_files():
        try:
            out[p.relative_to(ROOT).as_posix()] = parse(p)
        except DocError:
            out[p.relative_to(ROOT).as_posix()] = []  # reported by test_blocks_are_tagged_and_markers_valid
    return out

_BLOCKS = _all_blocks()
_SKIPPED = [(b, r) for bs in _BLOCKS.values() for b in bs if b.lang not in INERT_LANGS and (r := skip_reason(b))]

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    # the same cache as the face tests (converted once per session), not the user's
    return os.environ.get("VEILFACE_MODEL_DIR") or str(tmp_path_factory.getbasetemp() / "veilface_models")

def test_blocks_are_tagged_and_markers_valid():
    errors = []
    for p in doc_files():
        try:
            parse(p)
        except DocError as exc:
            errors.append(str(exc))
    assert not errors, "\n".join(errors)

@pytest.mark.parametrize("doc", sorted(_BLOCKS))
def test_doc_blocks_run(doc, tmp_path, model_dir):
    workdir = prepare_workdir(tmp_path)
    run, skipped = runnable(_BLOCKS[doc], workdir)
    for b, reason in skipped:
        print(f"docs-test skipped {b.where}: {reason}")
    if not run:
        pytest.skip(f"{doc}: no code block to run" + (f" ({len(skipped)} skipped)" if skipped else ""))
    code, out = run_blocks(run, workdir, env={"VEILFACE_MODEL_DIR": model_dir, "MPLBACKEND": "Agg"})
    if code != 0:
        failed = re.findall(r"docs-test FAILED: .*", out)
        pytest.fail((failed[-1] if failed else f"{doc}: the docs driver exited {code}") + "\n\n" + out[-12000:],
                    pytrace=False)

@pytest.mark.parametrize("where, reason", [(b.where, r) for b, r in _SKIPPED] or [("-", "")])
def test_skipped_blocks_are_listed(where, reason):
    """Each block that is not run shows up in the ``-ra`` summary with its reason."""
    if where == "-":
        return
    pytest.skip(f"docs block {where} not run: {reason}")

# -- the machinery itself -----------------------------------------------------------------
def _md(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "doc.md"
    p.write_text(text)
    return p

def _run_md(tmp_path: Path, text: str) -> tuple[int, str, list[tuple[Block, str]]]:
    blocks = parse(_md(tmp_path, text), root=tmp_path)
    workdir = prepare_workdir(tmp_path / "run")
    run, skipped = runnable(blocks, workdir)
    code, out = run_blocks(run, workdir, root=tmp_path, timeout=120)
    return code, out, skipped

def test_a_failing_python_block_names_file_and_line(tmp_path):
    code, out, _ = _run_md(tmp_path, "# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 1\ny = undefined_name\n```\n")
    assert code == 1
    assert "docs-test FAILED: doc.md:10 (python block)" in out
    assert 'doc.md", line 11' in out and "NameError" in out  # traceback points into the markdown

def test_a_failing_command_names_its_line(tmp_path):
    code, out, _ = _run_md(tmp_path, "```sh\necho one > f.txt   # comment\ncat f.txt \\\n  | grep -q one\nfalse\n```\n")
    assert code == 1
    assert "docs-test FAILED: doc.md:5: exit 1: false" in out

def test_blocks_share_a_namespace_and_a_working_dir(tmp_path):
    code, out, _ = _run_md(tmp_path, "```python\nopen('a.txt', 'w').write('hi')\nv = 2\n```\n"
                                     "```console\n$ grep -q hi a.txt\nhi (output, not run)\n```\n"
                                     "```python\nassert v == 2\n```\n"
                                     "```sh\nveilface --version\npython -c 'import engine'\n```\n")
    assert code == 0, out

def test_markers_skip_needs_and_setup(tmp_path):
    code, out, skipped = _run_md(tmp_path, (
        "<!-- docs-test: skip: installs things -->\n```sh\nexit 3\n```\n"
        "<!-- docs-test: needs: no/such/dir -->\n\n```python\nraise SystemExit(3)\n```\n"
        "<!-- docs-test: setup\nhidden = 41\n-->\n```python\nassert hidden + 1 == 42\n```\n"
        "```toml\n[veilface]\nport = 0\n```\n```text\nnot run $ exit 3\n```\n"))
    assert code == 0, out
    assert [(b.line, r) for b, r in skipped] == [(3, "installs things"), (8, "needs no/such/dir, which is not here")]

def test_hidden_setup_failure_is_reported(tmp_path):
    code, out, _ = _run_md(tmp_path, "<!-- docs-test: setup\nraise ValueError('boom')\n-->\n```python\npass\n```\n")
    assert code == 1 and "docs-test FAILED: doc.md:2 (hidden setup)" in out

def test_bad_json_and_toml_fail(tmp_path):
    code, out, _ = _run_md(tmp_path, "```json\n{\"a\": 1,}\n```\n")
    assert code == 1 and "JSON does not parse" in out
    code, out, _ = _run_md(tmp_path, "```toml\nport = \n```\n")
    assert code == 1 and "TOML does not parse" in out

@pytest.mark.parametrize("text, message", [
    ("```\nls\n```\n", "doc.md:1: code block without a language"),
    ("```ruby\nputs 1\n```\n", "doc.md:1: code block language 'ruby'"),
    ("<!-- docs-test: skipp: x -->\n```sh\nls\n```\n", "doc.md:1: unknown docs-test marker"),
    ("<!-- docs-test: skip: x -->\nsome prose\n```sh\nls\n```\n", "doc.md:1: docs-test marker not followed by a code block"),
    ("<!-- docs-test: setup\nx = 1\n", "doc.md:1: unterminated docs-test setup comment"),
])
def test_malformed_docs_are_errors(tmp_path, text, message):
    with pytest.raises(DocError, match=re.escape(message)):
        parse(_md(tmp_path, text), root=tmp_path)

def test_a_block_left_running_is_killed(tmp_path):
    code, out, _ = _run_md(tmp_path, "```python\nimport subprocess, sys\n"
                                     "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                                     "open('pid', 'w').write(str(child.pid))\n```\n")
    assert code == 0, out
    pid = int((tmp_path / "run" / "work" / "pid").read_text())
    for _ in range(600):  # the group was SIGKILLed before run_blocks returned; only reaping can lag
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"process {pid} started by a docs block is still running")



if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--driver":
        sys.exit(_driver(sys.argv[2]))
    # `python tests/test_docs.py [FILE.md ...]`: run the docs outside pytest (shows every command)
    import tempfile
    files = [Path(a).resolve() for a in sys.argv[1:]] or doc_files()
    status = 0
    for f in files:
        blocks = parse(f)
        with tempfile.TemporaryDirectory() as tmp:
            work = prepare_workdir(Path(tmp))
            run, skipped = runnable(blocks, work)
            for b, reason in skipped:
                print(f"skipped {b.where}: {reason}")
            rc, output = run_blocks(run, work)
            print(output)
            print(f"{f.relative_to(ROOT)}: {'OK' if rc == 0 else 'FAILED'} ({len(run)} blocks run, {len(skipped)} skipped)")
            status |= rc != 0
    sys.exit(status)
