"""Every command README.md shows runs as written.

The commands of its `sh` and `console` blocks run in order, with bash, in one fresh directory
that sees the repository's configs/ and tools/ (so later commands find earlier ones' runs), with
`python` the interpreter running the tests. A command whose comment begins with `needs` (network,
a GPU, hours) says in the README why it is not run here. A `console` block shows `$ command`
followed by its output; where that output has an `error: ...` line, the command must fail with
exactly that line, and otherwise succeed.
"""
import os
import re
import subprocess
import sys

from tests.helpers import ROOT

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMENT = re.compile(r"\s#\s*(.*)$")


def readme_commands(text: str) -> list[tuple[str, str | None]]:
    """(command, the error line it must print or None) for each command the README runs."""
    commands = []
    for language, body in FENCE.findall(text):
        if language not in ("sh", "console"):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        if language == "console":
            starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
            for i, start in enumerate(starts):
                output = lines[start + 1:starts[i + 1] if i + 1 < len(starts) else len(lines)]
                error = next((line for line in output if line.startswith("error: ")), None)
                commands.append((lines[start][2:], error))
        else:
            commands += [(line, None) for line in lines if line.strip()]
    runnable = []
    for command, error in commands:
        comment = COMMENT.search(command)
        if comment and comment.group(1).startswith("needs"):
            continue
        runnable.append((COMMENT.sub("", command).strip(), error))
    return runnable


def test_readme_parser_reads_blocks_comments_and_errors():
    text = ("```sh\nmake demo   # needs PyPI\npython a.py \\\n  --x=1   # about 1 min\n\n```\n"
            "```console\n$ python b.py\nerror: b is not allowed\n$ python c.py\nok\n```\n"
            "```text\nnot a command\n```\n    indented text\n")
    assert readme_commands(text) == [("python a.py    --x=1", None),
                                     ("python b.py", "error: b is not allowed"),
                                     ("python c.py", None)]


def test_every_readme_command_runs(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        commands = readme_commands(f.read())
    assert len(commands) >= 5, "the parser found almost no commands in README.md's sh blocks"
    for name in ("configs", "tools"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)
    bin_dir = os.path.dirname(sys.executable)  # `python` in the README is this interpreter
    env = dict(os.environ, JAX_PLATFORMS="cpu", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    for command, error in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600, check=False)
        output = f"{command}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
        if error is None:
            assert result.returncode == 0, output
        else:
            assert result.returncode != 0 and error in result.stderr.splitlines(), output
