"""Every example of the manual runs as written: a doctest for shell.

**Marking.** Every fenced block of README.md and docs/*.md names its language, and every block of
code (shell or Python) says whether it runs, in its fence's info string:

- ```` ```bash runnable ```` is executed by the default suite;
- ```` ```bash runnable slow ```` is executed under ``pytest -m slow`` (``.ci/run`` runs that as its
  own step): blocks that take a minute or more on 2 shared cores (training with ``train``'s
  default recipe, starting Ray);
- ```` ```bash illustration: REASON ```` is not executed, and says why (a cluster, a foreground
  server, a real dataset); an ``illustration`` without a reason, or a code block with neither
  word, fails :func:`test_every_code_block_is_marked`.

**Running.** Per page, the blocks run in order with ``bash -e -o pipefail`` (Python blocks with
this interpreter) in one temporary workspace laid out as the page's examples assume: tiny phantom
data made with the project's own ``synth`` code and a tiny trained run and export, built once per
session, copied in at the very paths the page names (:data:`WORKSPACES`). The command text is
never rewritten: ``kidney-edge`` and ``python`` are shims on ``PATH`` for ``python -m kidney_edge``
of this checkout, and ``pip`` is a shim that installs nothing: ``pip install`` lines are checked
against pyproject.toml's extras instead (:func:`test_pip_install_lines_name_real_extras`), in
every block, runnable or not. Where the machine allows (``unshare -rn``), a page runs in its own
network namespace, loopback only: an example that reaches the network fails, and ``serve``'s
port 8000 cannot collide with another run. A failing block reports its page, line, exit code and
stderr. When a ```` ```text ```` block follows a runnable one, every line of it (``...`` lines
skipped) must appear in what the commands printed, whitespace collapsed and decimal numbers
(timings) masked.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from conftest import CI_VARIABLE

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SHELLS = {"bash", "sh", "shell", "console", "zsh"}
CODE = SHELLS | {"python"}
FAST_TIMEOUT_S, SLOW_TIMEOUT_S = 180, 1200  # per block; generous for a shared 2-core machine


def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # the opening fence's line, 1-based
    info: str  # the fence's info string: "bash runnable slow"
    body: str
    expected: str | None = None  # a ```text block right below a runnable one

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def words(self) -> list[str]:
        return self.info.split()[1:]

    @property
    def runnable(self) -> bool:
        return self.words[:1] == ["runnable"]

    @property
    def slow(self) -> bool:
        return self.runnable and "slow" in self.words

    @property
    def illustration_reason(self) -> str | None:
        rest = self.info[len(self.language) :].strip()
        if not rest.startswith("illustration"):
            return None
        return rest[len("illustration") :].lstrip(":").strip()

    def where(self) -> str:
        return f"{self.page.name}:{self.line}"


def code_blocks(path: Path, text: str | None = None) -> list[Block]:
    """Every fenced block of a Markdown file, with the expected output of runnable ones."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    found: list[tuple[int, int, str, str]] = []  # (open line, close line, info, body), 0-based
    index = 0
    while index < len(lines):
        if lines[index].lstrip().startswith("```"):
            close = index + 1
            while close < len(lines) and not lines[close].lstrip().startswith("```"):
                close += 1
            body = "".join(line + "\n" for line in lines[index + 1 : close])
            found.append((index, close, lines[index].lstrip()[3:].strip(), body))
            index = close
        index += 1
    blocks = []
    for number, (start, end, info, body) in enumerate(found):
        block = Block(path, start + 1, info, body)
        if block.runnable and number + 1 < len(found):
            next_start, _, next_info, next_body = found[number + 1]
            if next_info == "text" and not "".join(lines[end + 1 : next_start]).strip():
                block = Block(path, start + 1, info, body, next_body)
        blocks.append(block)
    return blocks


def marking_problems(blocks: list[Block]) -> list[str]:
    """A fence without a language, or code that neither runs nor says why not."""
    problems = []
    for block in blocks:
        if not block.language:
            problems.append(f"{block.where()}: a fence without a language (```text for diagrams and output)")
        elif block.language in CODE and not block.runnable:
            reason = block.illustration_reason
            if reason is None:
                problems.append(
                    f"{block.where()}: ```{block.info} is neither 'runnable' nor 'illustration: REASON'"
                )
            elif not reason:
                problems.append(f"{block.where()}: ```{block.info} gives no reason")
    return problems


# ----------------------------------------------------------------------------- pip lines

PIP_INSTALL = re.compile(r"^\s*(?:python -m )?pip install (.+?)\s*(?:#.*)?$", re.M)


@cache
def project_extras() -> tuple[str, frozenset[str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return project["name"], frozenset(project["optional-dependencies"])


def pip_problems(block: Block) -> list[str]:
    """Each ``pip install`` must name this project (``-e .`` or its name) and extras it declares."""
    name, extras = project_extras()
    problems = []
    for match in PIP_INSTALL.finditer(block.body):
        for argument in match.group(1).split("&&")[0].split():
            argument = argument.strip("'\"")
            if argument == "-e" or argument.startswith("--"):
                continue
            package, _, wanted = argument.partition("[")
            if package not in (".", name):
                problems.append(f"{block.where()}: pip install {argument}: not this project ({name})")
            for extra in filter(None, (e.strip() for e in wanted.rstrip("]").split(","))):
                if extra not in extras:
                    problems.append(
                        f"{block.where()}: pip install {argument}: no extra {extra!r} in pyproject.toml"
                    )
    return problems


# ----------------------------------------------------------------------------- workspaces

# The paths each page's examples start from (what the page itself creates is not listed).
# Data folders are tiny phantom sets, models/kaggle a tiny trained run of CT-KIDNEY-DATASET,
# export/* its export, single files slices of the phantom.
WORKSPACES: dict[str, tuple[str, ...]] = {
    "README.md": ("my_slices", "new_slices"),
    "data-and-splits.md": (),
    "dicom.md": ("export/demo",),
    "edge-runtime.md": ("new_slices", "export/kaggle"),
    "evaluation.md": ("CT-KIDNEY-DATASET", "models/kaggle", "export/kaggle"),
    "export-and-int8.md": ("CT-KIDNEY-DATASET", "models/kaggle"),
    "ray.md": ("new_slices", "export/kaggle"),
    "report-page.md": ("new_slices", "export/kaggle"),
    "serve.md": ("export/kaggle", "slice.jpg", "slice.dcm", "a.jpg", "b.png"),
    "training.md": ("CT-KIDNEY-DATASET", "new_slices", "slice.jpg"),
    "unknown-inputs.md": (),
}
# Optional modules a page's examples use (missing: skipped locally, a failure under CI).
NEEDS: dict[str, tuple[str, ...]] = {
    "README.md": ("torch",),
    "dicom.md": ("pydicom",),
    "serve.md": ("fastapi", "uvicorn", "pydicom"),
    "ray.md": ("ray",),
    "training.md": ("torch",),
    "evaluation.md": ("torch",),
    "export-and-int8.md": ("torch",),
    "unknown-inputs.md": ("pydicom",),
}
# The base the workspaces are copied from: where each item lives in it.
BASE_ITEMS = {
    "CT-KIDNEY-DATASET": "CT-KIDNEY-DATASET",
    "my_slices": "CT-KIDNEY-DATASET",
    "new_slices": "new_slices",
    "models/kaggle": "models/kaggle",
    "export/kaggle": "export/kaggle",
    "export/demo": "export/kaggle",
    "slice.jpg": "slice.jpg",
    "a.jpg": "slice.jpg",
    "b.png": "b.png",
    "slice.dcm": "slice.dcm",
}
NEEDS_MODEL = {"models/kaggle", "export/kaggle", "export/demo"}


def _phantom_data(base: Path) -> None:
    """60 slices for training (every class in val and test) and 8 new ones to predict."""
    from PIL import Image

    from kidney_edge.phantoms.classic import synthesize

    synthesize(base / "CT-KIDNEY-DATASET", n=60, size=128, seed=0, difficulty=0.25)
    synthesize(base / "new_slices", n=8, size=128, seed=1, difficulty=0.25)
    first = sorted((base / "new_slices" / "Tumor").glob("*.jpg"))[0]
    shutil.copy(first, base / "slice.jpg")
    Image.open(first).save(base / "b.png")


def _phantom_dicom_slice(base: Path) -> None:
    from kidney_edge.phantoms.dicom_series import SeriesPhantomConfig, synthesize_series

    synthesize_series(base / "series", SeriesPhantomConfig(n_series=1, size=128, quirks=False))
    slices = sorted(path for path in (base / "series").glob("PH*/*/*/*") if path.is_file())
    shutil.copy(slices[len(slices) // 2], base / "slice.dcm")


def _tiny_run_and_export(base: Path) -> None:
    """The smallest training that goes through every stage (64 px: the default pair arch sees two
    32 px halves; one fine-tuning epoch), exported."""
    import torch

    from kidney_edge.export import export_model
    from kidney_edge.training import TrainConfig, train
    from kidney_edge.training.config import PhaseConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions run fastest on one thread (see conftest)
    try:
        config = TrainConfig(
            data_dir=base / "CT-KIDNEY-DATASET", out_dir=base / "models" / "kaggle", image_size=64,
            batch_size=16, head=PhaseConfig("head", epochs=2, lr=1e-2),
            finetune=PhaseConfig("finetune", epochs=1, lr=1e-3, unfreeze_blocks=1),
        )  # fmt: skip
        train(config)
        export_model(base / "models" / "kaggle", base / "export" / "kaggle")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def docs_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom data and slices (models come from :func:`docs_model`, only when a page needs one)."""
    base = tmp_path_factory.mktemp("docs-base")
    _phantom_data(base)
    return base


@pytest.fixture(scope="session")
def docs_model(docs_base: Path) -> Path:
    pytest.importorskip("torch")
    _tiny_run_and_export(docs_base)
    return docs_base


def lay_out(work: Path, base: Path, items: tuple[str, ...]) -> None:
    for item in items:
        source, target = base / BASE_ITEMS[item], work / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)  # a copy: predict and serve write beside the model
        else:
            shutil.copy(source, target)


# ----------------------------------------------------------------------------- running


def _shims(folder: Path) -> Path:
    """kidney-edge and python: this checkout; pip: checked, not run."""
    folder.mkdir()
    scripts = {
        "kidney-edge": f'#!/bin/sh\nexec "{sys.executable}" -m kidney_edge "$@"\n',
        "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
        "pip": "#!/bin/sh\necho \"docs test: 'pip $*' not run (tests/test_docs_examples.py checks its extras)\"\n",
    }
    for name, script in scripts.items():
        (folder / name).write_text(script)
        (folder / name).chmod(0o755)
    return folder


@cache
def _isolation() -> tuple[str, ...]:
    """A command prefix that runs in a fresh network namespace with loopback up, if this machine allows."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return ()
    prefix = ("unshare", "-rn", "sh", "-c", 'ip link set lo up && exec "$@"', "sh")
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else ()


def run_block(block: Block, work: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if block.language == "python":
        command = [sys.executable, "-c", block.body]
    else:
        command = ["bash", "-e", "-o", "pipefail", "-c", block.body]
    timeout = SLOW_TIMEOUT_S if block.slow else FAST_TIMEOUT_S
    try:
        return subprocess.run(
            [*_isolation(), *command], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"{block.where()}: still running after {timeout} s\n{block.body}\n{expired.stderr}")


def _normalise(text: str) -> str:
    text = re.sub(r"[─━│┃┏┓┗┛┡┩└┘┌┐╇┳┻╋├┤┼═║╔╗╚╝]", " ", text)
    text = re.sub(r"\d+\.\d+", "#", text)
    return " ".join(text.split())


def output_problems(block: Block, printed: str) -> list[str]:
    seen = _normalise(printed)
    return [
        f"{block.where()}: {line!r} not printed"
        for line in (block.expected or "").splitlines()
        if line.strip() and line.strip() != "..." and _normalise(line) not in seen
    ]


def _need_program(name: str) -> None:
    if shutil.which(name):
        return
    if os.environ.get(CI_VARIABLE, "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{CI_VARIABLE} is set, so a missing program fails: the docs' examples need {name}")
    pytest.skip(f"the docs' examples need {name}")


def _page_param(page: Path) -> object:
    blocks = [block for block in code_blocks(page) if block.runnable]
    marks = [pytest.mark.slow] if any(block.slow for block in blocks) else []
    return pytest.param(page, marks=marks, id=page.name)


PAGES = [page for page in doc_files() if any(block.runnable for block in code_blocks(page))]


@pytest.mark.parametrize("page", [_page_param(page) for page in PAGES])
def test_page_examples_run_as_written(page: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    for module in NEEDS.get(page.name, ()):
        pytest.importorskip(module)
    blocks = [block for block in code_blocks(page) if block.runnable]
    if any("curl " in block.body for block in blocks):
        _need_program("curl")
    items = WORKSPACES[page.name]
    base = request.getfixturevalue("docs_model" if NEEDS_MODEL & set(items) else "docs_base")
    if "slice.dcm" in items and not (base / "slice.dcm").exists():
        _phantom_dicom_slice(base)
    work = tmp_path / "work"
    work.mkdir()
    lay_out(work, base, items)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PATH": f"{_shims(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "100",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "no_proxy": "127.0.0.1,localhost",  # curl to serve's loopback address, whatever proxy is set
    }
    for block in blocks:
        result = run_block(block, work, env)
        printed = result.stdout + result.stderr
        assert result.returncode == 0, (
            f"{block.where()}: exit code {result.returncode}\n{block.body}--- stderr:\n{result.stderr[-6000:]}"
            f"\n--- stdout:\n{result.stdout[-3000:]}"
        )
        assert output_problems(block, printed) == [], printed


# ----------------------------------------------------------------------------- the rules themselves


def test_every_code_block_is_marked() -> None:
    assert [problem for page in doc_files() for problem in marking_problems(code_blocks(page))] == []


def inline_pip_lines(page: Path) -> list[Block]:
    """``pip install ...`` in inline code (the README's install table), as one-line blocks."""
    return [
        Block(page, number, "inline", span + "\n")
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        for span in re.findall(r"`(pip install [^`]+)`", line)
    ]


def test_pip_install_lines_name_real_extras() -> None:
    """pip install is never run by the docs test; what it asks for must exist (blocks and inline code)."""
    blocks = [block for page in doc_files() for block in [*code_blocks(page), *inline_pip_lines(page)]]
    assert sum(bool(PIP_INSTALL.search(block.body)) for block in blocks) >= 10
    assert [problem for block in blocks for problem in pip_problems(block)] == []


def test_every_page_with_examples_has_a_workspace() -> None:
    assert [page.name for page in PAGES if page.name not in WORKSPACES] == []
    assert {item for items in WORKSPACES.values() for item in items} <= set(BASE_ITEMS)
    assert len(PAGES) >= 8


def test_marking_rule_catches_unmarked_and_unreasoned_blocks(tmp_path: Path) -> None:
    """Seen red: a bare bash block, an illustration without a reason, a fence with no language."""
    page = tmp_path / "page.md"
    text = (
        "```bash\nkidney-edge train DATA\n```\n\n```bash illustration\nray start --head\n```\n\n"
        "```\na -> b\n```\n\n```bash illustration: needs a cluster\nray start --head\n```\n"
        "```python runnable slow\nprint(1)\n```\n```json\n{}\n```\n"
    )
    problems = marking_problems(code_blocks(page, text))
    assert [problem.split(":")[1] for problem in problems] == ["1", "5", "9"], problems
    blocks = code_blocks(page, text)
    assert blocks[3].illustration_reason == "needs a cluster" and blocks[4].slow


def test_pip_check_catches_a_missing_extra_and_another_package(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    text = (
        '```bash illustration: set-up\npip install -e ".[train,gpu]" && kidney-edge demo\n'
        'pip install "kidney-edge[serve]"   # the API\npip install requests\n```\n'
    )
    problems = pip_problems(code_blocks(page, text)[0])
    assert len(problems) == 2, problems
    assert "no extra 'gpu'" in problems[0] and "requests: not this project" in problems[1]


def test_a_failing_block_names_its_page_and_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("intro\n\n```bash runnable\ntrue\nfalse\necho never\n```\n")
    (block,) = code_blocks(page)
    result = run_block(block, tmp_path, dict(os.environ))
    assert block.where() == "page.md:3" and result.returncode == 1 and "never" not in result.stdout


def test_runnable_output_check_catches_a_changed_line(tmp_path: Path) -> None:
    """Seen red: an output block edited by hand no longer matches what the command prints."""
    page = tmp_path / "page.md"
    page.write_text(
        "```bash runnable\necho 'wrote 40 images in 1.2 s'\n```\n```text\nwrote 41 images in 9.9 s\n```\n"
    )
    block = code_blocks(page)[0]
    printed = subprocess.run(["bash", "-c", block.body], capture_output=True, text=True).stdout
    assert output_problems(block, printed) == ["page.md:1: 'wrote 41 images in 9.9 s' not printed"]
    assert (
        output_problems(Block(page, 1, "bash runnable", block.body, "wrote 40 images in 9.9 s\n"), printed)
        == []
    )
