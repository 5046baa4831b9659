"""Reading torch.save files safely, with one sentence on what is wrong with a file that fails.

`torch.load(weights_only=True)` refuses pickled code, but its errors describe the loader, not the
file: random bytes and pickled code both come back as "Weights only load failed ... set
`weights_only=False`", an empty file as a bare EOFError, a truncated one as a miniz error. Here
the file itself (its size, its first bytes) says which case it is, and the advice to turn the
safety off is never passed on.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tb_lightning.core.errors import UserError

# torch.save's zip format; torch itself only checks these first four bytes (_is_zipfile).
ZIP_MAGIC = b"PK\x03\x04"
# torch.save's legacy (pre-1.6) format opens with its magic number pickled at protocol 2.
LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]  # without the STOP opcode
# Files users mistake for weights, by their first bytes.
SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"\x1f\x8b": "a gzip archive",
    b"\x93NUMPY": "a NumPy .npy array",
    b"\x89HDF\r\n\x1a\n": "an HDF5 file (Keras/TensorFlow weights?)",
}
# What git leaves in the checkout when a file stored with Git LFS was not fetched.
LFS_POINTER = b"version https://git-lfs"
# The weights-only unpickler's reasons that mean "this file asks for code to be run"; the group
# is the refused object. Other reasons (unsupported operand, ...) mean garbage, not code.
CODE_REASONS = (
    re.compile(r"GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs|$)", re.MULTILINE),
    re.compile(r"create new object for .* but got (.+)$", re.MULTILINE),
    re.compile(r"Can only build .* but got (.+)$", re.MULTILINE),
    re.compile(r"`?`?(torch\.\S+)`?`? must be imported to load"),
)
IDENTIFIER = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*")


def load_torch_file(
    path: str | Path, subject: str, expected: str, error: type[UserError] = UserError
) -> Any:
    """torch.load(path, weights_only=True) on the CPU; a failure raises `error` with one sentence.

    subject starts the sentence and names the file (`Checkpoint /x.ckpt`,
    `model.net.weights=/x.pth`); expected is what to pass instead (`a checkpoint written by ...`).
    """
    try:
        with warnings.catch_warnings():
            # Garbage or a plain pickle can trip torch's "file an issue" protocol warning.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; each is classified below
        raise error(describe_load_failure(Path(path), err, subject, expected)) from None


def describe_load_failure(path: Path, err: Exception, subject: str, expected: str) -> str:
    """One sentence on why torch.load failed on path: missing, empty, not torch, truncated, code."""
    if isinstance(err, FileNotFoundError) or not path.exists():
        return f"{subject} does not exist; check the path, or pass {expected}."
    if path.is_dir():
        return f"{subject} is a directory, not a file; pass {expected}."
    if isinstance(err, OSError):
        return (
            f"{subject} cannot be read ({err.strerror or err}); check the file and its permissions."
        )
    if path.stat().st_size == 0:
        return (
            f"{subject} is empty (0 bytes), as when a save or a copy is cut short; copy it "
            f"again, or pass {expected}."
        )
    refused = refused_object(err)
    if refused:
        return refusal(subject, refused, expected)
    with path.open("rb") as f:
        head = f.read(512)
    if head.startswith(ZIP_MAGIC):
        return describe_zip_failure(path, err, subject, expected)
    if head.startswith(LEGACY_MAGIC):
        if isinstance(err, EOFError) or "EOF" in str(err):
            return (
                f"{subject} is truncated (it ends before its data does, as when a save or a "
                f"copy is cut short); copy it again, or pass {expected}."
            )
        return f"{subject} is damaged ({short_reason(err)}); copy it again, or pass {expected}."
    # A plain pickle of protocol 4+ fails on its framing before torch sees any code, so its
    # opcodes are read (never run) for the code it would call.
    refused = pickled_global(path)
    if refused:
        return refusal(subject, refused, expected)
    if head.startswith(LFS_POINTER):
        return (
            f"{subject} is a Git LFS pointer, not the file itself; fetch the file with "
            "`git lfs pull`."
        )
    return f"{subject} is not a PyTorch file ({looks_like(head)}); pass {expected}."


def refusal(subject: str, refused: str, expected: str) -> str:
    """The sentence for a file that holds pickled code; never the advice to unset weights_only."""
    return (
        f"{subject} was refused because loading it could run code (it asks for {refused}, "
        f"not tensors and plain containers); pass {expected}."
    )


def describe_zip_failure(path: Path, err: Exception, subject: str, expected: str) -> str:
    """A file that starts like torch.save's zip format but does not load."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        # The zip directory sits at the end of the file: a cut-short file has none.
        return (
            f"{subject} is truncated or damaged (it starts like a PyTorch file but lacks the zip "
            "directory written at its end, as when a save or a copy is cut short); copy it "
            f"again, or pass {expected}."
        )
    if not any(name.endswith("/data.pkl") for name in names):
        return (
            f"{subject} is a zip archive but not a PyTorch file (it holds no data.pkl); "
            f"pass {expected}."
        )
    return f"{subject} is damaged ({short_reason(err)}); copy it again, or pass {expected}."


def refused_object(err: Exception) -> str | None:
    """What a weights-only load refused as code (e.g. `posix.system`), or None if not that."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    message = str(err)
    for pattern in CODE_REASONS:
        match = pattern.search(message)
        if match:
            refused = match.group(1).strip().strip("`")
            # A text file starting with "c" reads as a GLOBAL too: its "name" is no identifier.
            if "GLOBAL" in pattern.pattern and not IDENTIFIER.fullmatch(refused):
                return None
            return refused
    return None


def pickled_global(path: Path) -> str | None:
    """The first function or class a pickle file imports (`builtins.print`), read without
    running anything; None for a pickle of plain data or a file that is not a pickle."""
    pushed: list[str | None] = []  # what each opcode pushed, where it is a string
    memo: dict[int, str | None] = {}
    try:
        with path.open("rb") as f:
            for opcode, arg, _ in pickletools.genops(f):
                name = opcode.name
                if name in ("GLOBAL", "INST"):  # protocols 0-3: "module name" inline
                    found = str(arg).replace(" ", ".")
                    return found if IDENTIFIER.fullmatch(found) else None
                if name == "STACK_GLOBAL":  # protocol 4+: module and name pushed before it
                    found = ".".join(str(part) for part in pushed[-2:])
                    return found if IDENTIFIER.fullmatch(found) else "an object it imports"
                if name == "STOP":
                    return None
                if name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                elif name not in ("PROTO", "FRAME"):
                    pushed.append(arg if isinstance(arg, str) else None)
    except Exception:  # not a pickle after all (text, garbage): genops stops on a bad opcode
        return None
    return None


def short_reason(err: Exception) -> str:
    """torch's first sentence, without its miniz boilerplate or any advice to unset weights_only."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    first = first.split(". This is an internal miniz error")[0].rstrip(".")
    if not first or "weights_only" in first:
        return type(err).__name__
    return f"{type(err).__name__}: {first}"


def looks_like(head: bytes) -> str:
    """What a non-PyTorch file seems to be, from its first bytes, for the error message."""
    for magic, what in SIGNATURES.items():
        if head.startswith(magic):
            return f"it is {what}"
    if len(head) >= 2 and head[0] == pickle.PROTO[0] and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return "it is a plain Python pickle, not written by torch.save"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        first_line = text.strip().splitlines()[0] if text.strip() else ""
        return f"it is a text file starting {first_line[:40]!r}"
    return "its first bytes are not those of a torch.save file"


def describe_key_mismatch(own: Mapping[str, Any], state: Mapping[str, Any], limit: int = 3) -> str:
    """How state fails to fit a network whose state dict is own, or "" when it fits.

    E.g. `lacks 2 keys of the network (a, b), has 1 key with the wrong shape (c 1x9216 for
    1x4096)`, each list cut at `limit` keys.
    """

    def first(keys: list[str]) -> str:
        more = f", ... {len(keys)} in all" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {shape(state[k])} for {shape(own[k])}"
        for k in own
        if k in state and getattr(state[k], "shape", None) != own[k].shape
    ]
    parts = []
    if missing:
        parts.append(f"lacks {keys(missing)} of the network ({first(missing)})")
    if unexpected:
        parts.append(f"has {keys(unexpected)} the network does not ({first(unexpected)})")
    if mismatched:
        parts.append(f"has {keys(mismatched)} with the wrong shape ({first(mismatched)})")
    return ", ".join(parts)


def keys(items: list[str]) -> str:
    return f"{len(items)} key" if len(items) == 1 else f"{len(items)} keys"


def shape(value: Any) -> str:
    """`1x9216` for a tensor of that shape; the type name for anything that is not a tensor."""
    if not isinstance(value, torch.Tensor):
        return type(value).__name__
    return "x".join(map(str, value.shape)) or "scalar"


CHECKPOINT_FIX = (
    "a checkpoint written by tb_lightning.train, e.g. "
    "outputs/train/runs/<run>/checkpoints/best.ckpt"
)


def load_checkpoint(path: str | Path, config_key: str | None = None) -> dict[str, Any]:
    """A Lightning checkpoint of this project, loaded without running pickled code.

    Any problem raises UserError with one sentence that starts `Checkpoint <path>` (or
    `<config_key>=<path>`, e.g. `ckpt_path=...`) and says what is wrong with the file: missing,
    empty, not a PyTorch file, truncated, holding code, or not a Lightning checkpoint.
    """
    subject = f"{config_key}={path}" if config_key else f"Checkpoint {path}"
    if not Path(path).expanduser().exists():
        raise UserError(
            f"{subject} does not exist; check {config_key or 'ckpt_path'} (pass {CHECKPOINT_FIX})."
        )
    checkpoint = load_torch_file(Path(path).expanduser(), subject, CHECKPOINT_FIX)
    problem = _not_a_checkpoint(checkpoint)
    if problem:
        raise UserError(f"{subject} {problem}; pass {CHECKPOINT_FIX}.")
    return checkpoint


def _not_a_checkpoint(obj: Any) -> str | None:
    """Why a loaded file is no Lightning checkpoint of this project, or None if it is one."""
    if not isinstance(obj, dict):
        return f"holds a {type(obj).__name__}, not a Lightning checkpoint"
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # The usual mix-up: a bare state dict, which model.net.weights= accepts.
        return (
            f"holds a plain state dict ({len(obj)} tensors), not a Lightning checkpoint with "
            "state_dict and hyper_parameters (to start training from these weights use "
            "model.net.weights=<path> instead)"
        )
    absent = [k for k in ("state_dict", "hyper_parameters") if not isinstance(obj.get(k), dict)]
    if absent:
        keys = ", ".join(map(str, list(obj)[:5])) + (", ..." if len(obj) > 5 else "")
        return (
            f"is not a Lightning checkpoint of tb_lightning: it has no {' or '.join(absent)} "
            f"(its keys: {keys or 'none'})"
        )
    return None
