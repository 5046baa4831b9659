"""Every command in README.md and docs/*.md runs as written, and every picture and page it links
exists.

The commands are read from the fenced code blocks (```bash, ```sh, ```console or a bare ```,
one command a line, `\\` continuations joined) and from inline code that starts like a command
(`python -m tb_lightning.<task> ...`, `.venv/bin/python -m ...`, `tb-train ...`, `make ...`).
Each is checked without running it:

- `make <target>`: the target is in the Makefile.
- `python -m tb_lightning.<task> <overrides>` (also `.venv/bin/python -m`, `tb-train`, `tb-eval`,
  `tb-predict`, `tb-export`, behind `srun`/`nohup`/`VAR=value`): the config is composed in-process
  with Hydra's compose API (conf/<task>.yaml, so a wrong key or group fails as it would on the
  command line) and given the checks of values the Hydra callback runs before every command
  (config/callback.py -> config/checks.py VALUE_CHECKS[task]). With `-m` every job of the sweep is
  composed as Hydra's basic sweeper will launch it (the grid `a=1,2 b=3,4`, or the params of a
  `sweep=` config) and checked, each swept value in at least one job; with another sweeper
  (Optuna) the base config. A `group=option` must name a file of conf/<group>/ (Hydra lets a
  typo through in an optional group).
- Placeholders (`<run>`, `...`, `/data/...`, `/path/to/...`) in values that must be existing
  files (ckpt_path, init_from, model.net.weights, input) become temporary files or folders: the
  checks that look for them on disk pass, everything else is checked as typed.
- `python <script>.py`: the script is in the repository; `pip install -e '.[extra]'`: the extra is
  in pyproject.toml.

A command that cannot be checked this way goes in ALLOWED with the reason; it must still compose.
"""

from __future__ import annotations

import copy
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from tb_lightning.config import CONF_DIR, PROJECT_ROOT
from tb_lightning.config.callback import job_config, sweep_jobs, task_config
from tb_lightning.config.checks import VALUE_CHECKS
from tb_lightning.core.errors import UserError

README = PROJECT_ROOT / "README.md"
DOCS_DIR = PROJECT_ROOT / "docs"
PACKAGE_DIR = PROJECT_ROOT / "src" / "tb_lightning"
PAGES = [README, *sorted(DOCS_DIR.glob("*.md"))]
README_MAX_LINES = 200

# The commands: one conf/<task>.yaml and src/tb_lightning/<task>.py each (train, eval, ...).
TASKS = tuple(
    p.stem for p in sorted(CONF_DIR.glob("*.yaml")) if (PACKAGE_DIR / f"{p.stem}.py").is_file()
)
CONSOLE_SCRIPTS = {f"tb-{task}": task for task in TASKS}
PYTHONS = ("python", "python3", ".venv/bin/python", "$(BIN)/python")
# Words that may stand before a command: a launcher, or a program that runs the rest.
PREFIXES = ("srun", "nohup", "time", "exec")
# Programs the docs mention whose commands are not ours to check (with why).
NOT_CHECKED = {
    "tensorboard": "TensorBoard's own command line",
    "mlflow": "MLflow's own command line",
    "apt-get": "the system's package manager",
    "sbatch": "SLURM's, not available here",
    "kill": "a shell built-in",
    "cd": "a shell built-in",
    "export": "a shell built-in",
    "git": "git's own command line",
    "jq": "a JSON tool",
}
# Commands that compose but cannot pass every check here, with the reason. Empty: every command
# in the docs passes (ImageNet weights, a GPU, a cluster are not needed by the checks of values).
ALLOWED: dict[str, str] = {}
# Settings that must name something on disk, and what a placeholder there becomes.
# Hydra's flags that print the composed config (and how many words follow them).
HYDRA_FLAGS = {"--cfg": 1, "-c": 1, "--package": 1, "-p": 1, "--resolve": 0, "--info": 0}
FILE_KEYS = ("ckpt_path", "init_from", "model.net.weights")
FOLDER_KEYS = ("input",)
SPECIAL_VALUES = {"ckpt_path": ("last", "null"), "model.net.weights": ("imagenet", "null")}
INLINE_START = re.compile(
    r"^(?:[A-Z_]+=\S+\s+)*(?:srun\s+|nohup\s+)?"
    r"(?:(?:\.venv/bin/)?python3?\s+-m\s+tb_lightning\.|tb-(?:train|eval|predict|export)\b|make\s)"
)
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
PLACEHOLDER = re.compile(r"<[^<>\n]+>")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    text: str
    inline: bool = False

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


# --- reading the pages -----------------------------------------------------------------------


def fenced_commands(page: Path) -> Iterator[Command]:
    """One Command per shell line of the page's fenced blocks, continuations joined."""
    lines = page.read_text().splitlines()
    in_block, shell, pending, start = False, False, "", 0
    for number, line in enumerate(lines, 1):
        fence = FENCE.match(line)
        if fence:
            in_block = not in_block
            shell = in_block and fence.group(2) in SHELL_LANGS
            continue
        if not (in_block and shell):
            continue
        text = line.strip()
        if text.startswith("$ "):
            text = text[2:]
        if not pending:
            start = number
        if text.endswith("\\"):
            pending += text[:-1].rstrip() + " "
            continue
        text, pending = (pending + text).strip(), ""
        if text and not text.startswith("#"):
            yield Command(page.name, start, text)


def inline_commands(page: Path) -> Iterator[Command]:
    """Inline code spans that are whole commands (python -m tb_lightning..., tb-train, make)."""
    in_block = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_block = not in_block
            continue
        if in_block:
            continue
        for span in re.findall(r"`([^`]+)`", line.replace("\\|", "|")):
            if INLINE_START.match(span.strip()):
                yield Command(page.name, number, span.strip(), inline=True)


def page_commands(page: Path) -> list[Command]:
    return [*fenced_commands(page), *inline_commands(page)]


# --- checking one command --------------------------------------------------------------------


def makefile_targets() -> set[str]:
    text = (PROJECT_ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.MULTILINE))


def pyproject_extras() -> set[str]:
    """The names in pyproject.toml's [project.optional-dependencies] (read without tomllib,
    which Python 3.10 lacks)."""
    text = (PROJECT_ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[-1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*=", section, flags=re.MULTILINE))


def split_words(text: str) -> tuple[list[str], dict[str, str]]:
    """The command's words up to a redirection or pipe, placeholders `<...>` as single tokens
    (PH<n>PH), and what each stood for."""
    placeholders: dict[str, str] = {}

    def mark(match: re.Match[str]) -> str:
        token = f"PH{len(placeholders)}PH"
        placeholders[token] = match.group(0)
        return token

    # `2>&1` and `> log` are not placeholders; a placeholder has no spaces around its brackets.
    words = shlex.split(PLACEHOLDER.sub(mark, text), comments=True)
    cut = next(
        (i for i, w in enumerate(words) if w in ("|", "&&", ";", "||") or re.match(r"^\d?>", w)),
        len(words),
    )
    return words[:cut], placeholders


def is_placeholder(value: str, placeholders: dict[str, str]) -> bool:
    return value == "..." or "..." in value or any(token in value for token in placeholders)


def concrete(value: str, placeholders: dict[str, str]) -> str:
    """A placeholder in a value that needs no file: its words, e.g. <queue> -> queue."""
    for token, text in placeholders.items():
        value = value.replace(token, re.sub(r"\W+", "_", text.strip("<>")).strip("_"))
    return value


def stand_in(key: str, value: str, placeholders: dict[str, str], tmp: Path) -> str:
    """The value to check: a temporary file or folder where the setting must exist on disk."""
    bare = key.lstrip("+~")
    if value in SPECIAL_VALUES.get(bare, ()):
        return value
    if bare in FILE_KEYS or bare in FOLDER_KEYS:
        if Path(value).exists() and not is_placeholder(value, placeholders):
            return value
        name = re.sub(r"\W+", "_", concrete(value, placeholders)).strip("_")[-60:] or "file"
        path = tmp / bare.replace(".", "_") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if bare in FOLDER_KEYS:
            path.mkdir(exist_ok=True)
        else:
            path.touch()
        return str(path)
    if is_placeholder(value, placeholders) and re.search(r"(root|dir|path|file)$", bare):
        folder = tmp / "stand-in" / bare.replace(".", "_")
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)
    return concrete(value, placeholders)


def parse_task(words: list[str]) -> tuple[str | None, list[str]]:
    """(task, its arguments) for `python -m tb_lightning.<task> ...` or `tb-<task> ...`."""
    if words and words[0] in CONSOLE_SCRIPTS:
        return CONSOLE_SCRIPTS[words[0]], words[1:]
    if len(words) >= 3 and words[0] in PYTHONS and words[1] == "-m":
        module = words[2]
        if module.startswith("tb_lightning."):
            return module.split(".", 1)[1], words[3:]
    return None, words


def unknown_options(overrides: list[str]) -> list[str]:
    """`group=option` where conf/<group>/ has no <option>.yaml. Hydra itself lets a typo through
    in the optional groups of conf/train.yaml (`experiment=quikstart` and `sweep=lr_dropuot`
    compose as if they were not there), so the docs are held to the files."""
    unknown = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if "." in key or key.startswith("hydra") or not (CONF_DIR / key).is_dir():
            continue
        for option in re.split(r"[,\[\]]", value):
            option = option.strip()
            if option and option != "null" and not (CONF_DIR / key / f"{option}.yaml").is_file():
                unknown.append(f"{key}={option} (no conf/{key}/{option}.yaml)")
    return unknown


def covering_jobs(jobs: list[list[str]]) -> list[int]:
    """Jobs that together hold every swept value at least once (3 of a 3 x 2 grid's 6): each
    value is checked, and a page with a few sweeps stays fast (a job composes in ~0.3 s)."""
    seen: set[str] = set()
    chosen = []
    for number, job in enumerate(jobs):
        if set(job) - seen:
            chosen.append(number)
            seen |= set(job)
    return chosen


def swept_values_set(master: DictConfig, job: list[str], swept: set[str]) -> DictConfig | None:
    """A job's config as the master config with its swept values set, when every swept key is a
    plain setting (no group, no hydra.*): what Hydra's full recomposition of the job gives, in
    milliseconds instead of a third of a second. None otherwise (the caller recomposes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = [o for o in OverridesParser.create().parse_overrides(job) if o.key_or_group in swept]
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or (CONF_DIR / key).is_dir() or override.package is not None:
            return None
        if override.is_add() or override.is_delete() or override.is_force_add():
            return None
    cfg = copy.deepcopy(master)
    for override in parsed:
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


def compose_and_check(task: str, overrides: list[str], multirun: bool) -> list[str]:
    """Compose `task` with these overrides (every job of a sweep) and run the checks of values;
    the mistakes found, as sentences."""
    mistakes: list[str] = []
    if not multirun:
        configs = [compose(config_name=task, overrides=overrides, return_hydra_config=True)]
    else:
        hydra_app = GlobalHydra.instance().hydra
        assert hydra_app is not None
        master = hydra_app.compose_config(
            config_name=task, overrides=overrides, run_mode=RunMode.MULTIRUN
        )
        sweep = sweep_jobs(master)
        if sweep is None:  # another sweeper (Optuna): its values are drawn as it runs
            configs = [master]
        else:
            configs = []
            jobs, swept = sweep
            for number in covering_jobs(jobs):
                job = jobs[number]
                cfg = swept_values_set(master, job, swept) or job_config(master, job)
                if cfg is None:
                    mistakes.append(f"job {number} ({' '.join(job)}) does not compose")
                else:
                    configs.append(cfg)
    for cfg in configs:
        mistake = check_values(task, cfg)
        if mistake:
            mistakes.append(mistake)
    return mistakes


def check_values(task: str, cfg: DictConfig) -> str | None:
    """What config/callback.py runs on the composed config, without swallowing surprises: an
    exception other than a user's mistake fails the test with its traceback. (The checks that
    import torch, e.g. of keys added with `+`, are left to the run: seconds each.)"""
    check = VALUE_CHECKS.get(task)
    try:
        if check is not None:  # a task without checks of values only composes
            check(task_config(cfg))
    except UserError as err:
        return str(err)
    return None


def check_command(command: Command, tmp: Path) -> str | None:
    """None when the command would run as written, else what is wrong with it."""
    try:
        words, placeholders = split_words(command.text)
    except ValueError as err:
        return f"not a shell command ({err}); label a block of other text ```text"
    while words and (re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]) or words[0] in PREFIXES):
        words = words[1:]  # VAR=value, srun, nohup: the command follows
    if not words:
        return None
    program = words[0]
    if program == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        missing = sorted(set(targets) - makefile_targets())
        return f"no Makefile target {', '.join(missing)}" if missing else None
    if program in ("pip", ".venv/bin/pip") or words[:3] in (["python", "-m", "pip"],):
        wanted = {
            extra.strip()
            for word in words
            for group in re.findall(r"\[([^\]]+)\]", word)
            for extra in group.split(",")
        }
        missing = sorted(wanted - pyproject_extras())
        return f"no extra {', '.join(missing)} in pyproject.toml" if missing else None
    task, arguments = parse_task(words)
    if task is None:
        if program in PYTHONS and len(words) > 1 and words[1].endswith(".py"):
            script = words[1]
            return None if (PROJECT_ROOT / script).is_file() else f"no script {script}"
        if program in NOT_CHECKED:
            return None
        return f"unknown program {program!r}: check it here, or add it to NOT_CHECKED with why"
    if any(token in task for token in placeholders):
        return None  # python -m tb_lightning.<task>: a pattern, not a command
    if task not in TASKS:
        return f"no entry point tb_lightning.{task} (the tasks are {', '.join(TASKS)})"
    multirun = any(a in ("-m", "--multirun") for a in arguments)
    if any(a in ("--help", "-h", "--hydra-help") for a in arguments):
        return None
    if command.inline and not arguments:
        return None  # `tb-eval`, `python -m tb_lightning.eval`: the command's name in a sentence
    overrides = []
    arguments = list(arguments)
    while arguments:
        argument = arguments.pop(0)
        if argument in ("-m", "--multirun") or argument == "..." or argument in placeholders:
            continue
        if argument in HYDRA_FLAGS:  # print the config and exit: it must still compose
            arguments = arguments[HYDRA_FLAGS[argument] :]
            continue
        if argument.startswith("-"):
            return f"{argument}: a Hydra flag this test does not know"
        key, sep, value = argument.partition("=")
        if not sep:
            return f"{argument!r} is not an override (key=value)"
        overrides.append(f"{key}={stand_in(key, value, placeholders, tmp)}")
    unknown = unknown_options(overrides)
    if unknown:
        return "no such option: " + ", ".join(unknown)
    try:
        mistakes = compose_and_check(task, overrides, multirun)
    except Exception as err:  # noqa: BLE001 - Hydra's own refusal: a wrong key, group or value
        return f"does not compose: {type(err).__name__}: {err}".splitlines()[0]
    if mistakes and command.text in ALLOWED:
        return None
    return "; ".join(mistakes) or None


@pytest.fixture
def hydra_conf():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_command_on_the_page_runs(page: Path, tmp_path: Path, hydra_conf: None) -> None:
    problems = []
    for command in page_commands(page):
        problem = check_command(command, tmp_path)
        if problem:
            problems.append(f"{command}\n    -> {problem}")
    assert not problems, f"{len(problems)} command(s) in {page.name} would not run:\n" + "\n".join(
        problems
    )


def anchors(page: Path) -> set[str]:
    """The #anchors of a page's headings, as GitHub makes them."""
    found = set()
    in_block = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            in_block = not in_block
        elif not in_block and (heading := re.match(r"^#{1,6}\s+(.*?)\s*$", line)):
            text = re.sub(r"[^\w\- ]", "", heading.group(1).lower())
            found.add(text.replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_picture_and_link_exists(page: Path) -> None:
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"^[a-z]+://|^mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            missing.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{page.name} links to files or headings that do not exist: {missing}"


REPO_PATH = re.compile(r"^(?:src|conf|tests|benchmarks|scripts|docs)/[\w./-]*$")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_every_file_the_page_names_exists(page: Path) -> None:
    """`src/tb_lightning/...`, `conf/...`, `scripts/...` in inline code: moved or renamed files
    leave no stale path behind."""
    missing = sorted(
        {
            span
            for span in re.findall(r"`([^`\s]+)`", page.read_text())
            if REPO_PATH.match(span) and not (PROJECT_ROOT / span).exists()
        }
    )
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_the_readme_is_a_front_door() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; move details into docs/ (at most {README_MAX_LINES})"
    )
    texts = [c.text for c in page_commands(README)]
    for wanted in ("make train", "make test", "make tensorboard", "make help"):
        assert any(t.startswith(wanted) for t in texts), f"README.md lost `{wanted}`"
    for task in TASKS:
        assert any(f"tb_lightning.{task}" in t for t in texts), f"README.md lost {task}"


def test_the_pages_are_read_at_all() -> None:
    """The extraction finds the commands (a page whose blocks it cannot read would pass)."""
    counts = {page.name: len(page_commands(page)) for page in PAGES}
    for name in ("README.md", "data.md", "training.md", "evaluation.md"):
        assert counts.get(name, 0) >= 4, counts


@pytest.mark.parametrize(
    "text, wrong",
    [
        ("python -m tb_lightning.train model.net.dropuot=0.3", "dropuot"),
        ("python -m tb_lightning.train data=kaggle", "kaggle"),
        ("python -m tb_lightning.train model.net.dropout=1.5", "dropout"),
        ("python -m tb_lightning.train -m model.net.dropout=0.3,1.5", "dropout"),
        ("python -m tb_lightning.train -m model.net.dropuot=0.3,0.5", "dropuot"),
        ("python -m tb_lightning.train -m sweep=lr_dropuot", "lr_dropuot"),
        ("python -m tb_lightning.train experiment=quikstart", "quikstart"),
        ("python -m tb_lightning.train 'logger=[tensorboard,mlflw]'", "mlflw"),
        ("python -m tb_lightning.eval ckpt_path=<run>/best.ckpt eval.split=train", "eval.split"),
        ("python -m tb_lightning.predict ckpt_path=... input=x batch_size=0", "batch_size"),
        ("python -m tb_lightning.export ckpt_path=... format=tflite", "format"),
        ("python -m tb_lightning.evaluate ckpt_path=...", "evaluate"),
        ("python -m tb_lightning.train +rooot=/data", "rooot"),
        ("make trian", "trian"),
        ("pip install -e '.[saliancy]'", "saliancy"),
    ],
)
def test_a_mistake_in_a_documented_command_fails(
    text: str, wrong: str, tmp_path: Path, hydra_conf: None
) -> None:
    problem = check_command(Command("example.md", 1, text), tmp_path)
    assert problem is not None and wrong in problem, problem


def test_placeholders_and_continuations_are_read(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python -m tb_lightning.eval ckpt_path=outputs/train/runs/<run>/best.ckpt` here.\n"
        "```bash\n"
        ".venv/bin/python -m tb_lightning.train data.root=/data/TB \\\n"
        "    trainer=cpu   # a comment\n"
        "make train > log 2>&1\n"
        "```\n"
    )
    texts = [c.text for c in page_commands(page)]
    assert texts == [
        ".venv/bin/python -m tb_lightning.train data.root=/data/TB trainer=cpu   # a comment",
        "make train > log 2>&1",
        "python -m tb_lightning.eval ckpt_path=outputs/train/runs/<run>/best.ckpt",
    ]
    words, placeholders = split_words(texts[1])
    assert words == ["make", "train"] and not placeholders


if __name__ == "__main__":  # list what the docs hold: python tests/test_docs.py
    for page in PAGES:
        for command in page_commands(page):
            print(command, file=sys.stdout)
