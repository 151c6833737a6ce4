"""Every block of the project's docs (README.md, CONTRIBUTING.md, docs/, deploy/, bench/)
works when pasted: the shell blocks run, as written, next to a
`make run` (`availability dev` with its demo fleet and its `.data/dev.env`), from a folder
laid out like the checkout; each Python block is a file under examples/ that a shell block
runs. A block that is not meant to run there says why, in `<!-- not run: why -->` just above
it; blocks of other languages (text, json, mermaid, none) are output or pictures."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from availability.local_stores import free_port
from availability.settings import Settings

from .helpers import store_env

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"sh", "bash", "console"}
NOT_RUN = re.compile(r"<!-- not run: (\S.*) -->")
# A command's comment says when it is meant to fail: the code's name, then the exit code.
MEANT_TO_FAIL = re.compile(r"#.*\b(\w+) \(exit (\d+)\)")
# A comment "-> {"name": ...}" names a field its output has.
SHOWS = re.compile(r'#\s*-> \{"(\w+)"')
STATUS = "__readme_exit__"


@dataclass(frozen=True)
class Block:
    document: str
    line: int
    language: str
    text: str
    not_run: str | None

    def commands(self) -> list[str]:
        """One entry a command line (backslash continuations joined), comments and blank
        lines left out."""
        joined = self.text.replace("\\\n", " ")
        return [c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


DOCUMENTS = (
    "README.md",
    "CONTRIBUTING.md",
    "docs/*.md",
    "docs/*/*.md",
    "deploy/**/*.md",
    "bench/README.md",
)
"""The project's own docs (the Node client's README shows npm and TypeScript: its own
tests run those)."""


def documents() -> list[Path]:
    return sorted({p for pattern in DOCUMENTS for p in ROOT.glob(pattern)})


def readme_blocks() -> list[Block]:
    blocks = []
    for document in documents():
        lines = document.read_text().splitlines()
        name = str(document.relative_to(ROOT))
        i = 0
        while i < len(lines):
            if lines[i].startswith("```"):
                end = lines.index("```", i + 1)
                above = next((line for line in reversed(lines[:i]) if line.strip()), "")
                marker = NOT_RUN.fullmatch(above.strip())
                text = "".join(f"{line}\n" for line in lines[i + 1 : end])
                language = lines[i][3:].strip()
                blocks.append(Block(name, i + 1, language, text, marker and marker[1]))
                i = end
            i += 1
    return blocks


def _to_run() -> list[Block]:
    return [b for b in readme_blocks() if b.language in SHELL and b.not_run is None]


def test_every_readme_block_runs_or_says_why_not() -> None:
    blocks = readme_blocks()
    shell = [b for b in blocks if b.language in SHELL]
    assert len(_to_run()) >= 5 and any(b.not_run for b in shell), [b.line for b in shell]
    assert {b.document for b in _to_run()} > {"README.md"}, "the docs' blocks run too"
    assert all(b.not_run is None for b in blocks if b.language not in SHELL)
    examples = {p.read_text(): p for p in (ROOT / "examples").glob("*.py")}
    python = [b for b in blocks if b.language == "python"]
    assert python and all(b.text in examples for b in python), "each is a file of examples/"
    commands = "".join(b.text for b in _to_run())
    for block in python:
        assert f"examples/{examples[block.text].name}" in commands, "and a shell block runs it"


def _start_dev(
    settings: Settings, data: Path, log: Path
) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    address, metrics = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = store_env(settings, address, METRICS_ADDRESS=metrics, LOG_FORMAT="text")
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "availability", "dev", "--reset", "--data-dir", str(data)],
            env=env,
            stdout=out,
            stderr=out,
        )
    # The user's other terminal: the addresses they set for make run, the stores only in
    # .data/dev.env.
    user = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VALKEY_URL")}
    return process, {**user, "GRPC_ADDRESS": address, "METRICS_ADDRESS": metrics}


def _wait_serving(process: subprocess.Popen[bytes], env: dict[str, str], log: Path) -> None:
    grpcurl = str(ROOT / ".venv" / "bin" / "grpcurl")
    check = [grpcurl, "-plaintext", env["GRPC_ADDRESS"], "grpc.health.v1.Health/Check"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        answer = subprocess.run(check, capture_output=True, text=True, env=env, check=False)
        if '"SERVING"' in answer.stdout and "Try it:" in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"not SERVING within 60 s:\n{log.read_text()[-3000:]}")


def _run(block: Block, folder: Path, env: dict[str, str]) -> list[tuple[str, int, str]]:
    """Runs the block's commands in one shell, as pasted line by line into a terminal (a
    failing line does not stop the next); returns (command, exit code, output) for each."""
    commands = block.commands()
    script = "".join(f"{c}\nprintf '\\n{STATUS} %d\\n' $?\n" for c in commands)
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )
    parts = re.split(rf"\n{STATUS} (\d+)\n", done.stdout)
    assert len(parts) == 2 * len(commands) + 1, done.stdout
    return [(c, int(parts[2 * i + 1]), parts[2 * i]) for i, c in enumerate(commands)]


@pytest.mark.slow
def test_readme_shell_blocks_work_next_to_make_run(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "checkout"
    folder.mkdir()
    for name in (".venv", "examples"):
        (folder / name).symlink_to(ROOT / name)
    log = tmp_path / "dev.log"
    process, env = _start_dev(settings, folder / ".data", log)
    try:
        _wait_serving(process, env, log)
        assert (folder / ".data" / "dev.env").exists()
        for block in _to_run():
            started = time.monotonic()
            for command, code, output in _run(block, folder, env):
                where = f"{block.document} line {block.line}: {command}\n{output}"
                fails = MEANT_TO_FAIL.search(command)
                assert code == (int(fails[2]) if fails else 0), where
                if fails:
                    assert fails[1] in output, where
                shows = SHOWS.search(command)
                if shows:
                    assert f'"{shows[1]}"' in output, where
                if not re.match(r"\w+=", command):
                    assert output.strip(), where
                assert "Traceback" not in output, where
            print(f"{block.document} line {block.line}: {time.monotonic() - started:.1f} s")
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()[-3000:]
    assert not (folder / ".data" / "dev.env").exists()
