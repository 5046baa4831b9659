"""What every entry point shares: user errors as one sentence, config helpers."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from tb_lightning.core.errors import Stopped, UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


def quiet_known_warnings() -> None:
    """Silence warnings that are expected here and would hide the ones that matter."""
    # The frozen AlexNet features stay in eval mode on purpose (see models/net.py).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # Lightning's own use of a torch API deprecated in newer torch releases.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # torchvision 0.29 deprecates its decoders in favour of torchcodec; this project pins
    # torchvision <= 0.29.1, where they work and are the fast path (data/transforms.py).
    warnings.filterwarnings("ignore", message=r"The image decoding and encoding capabilities")
    # Under DDP the logged epoch values are torchmetrics results, already synced across processes.
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\(.*sync_dist")
    # Small data sets have fewer batches per epoch than trainer.log_every_n_steps: the per-step
    # loss curve is then thinner, while every figure this project reads is logged per epoch.
    warnings.filterwarnings(
        "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging"
    )
    # The DataLoaders' workers are chosen here (data.num_workers=auto: one per spare core), and
    # on cached features (data.cache_features) none, on purpose: rows come from a memory map.
    warnings.filterwarnings("ignore", message=r"The '\w+' does not have many workers")
    # An advert for a cloud service printed at every Trainer start.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )


def log_lightning_through_hydra() -> None:
    """Print Lightning's log lines once, in Hydra's format, and into the run's log file.

    `import lightning` gives its top-level logger a console handler of its own ("INFO: ...");
    when Hydra has configured logging before that import (the entry points import Lightning
    late, for start-up time) every Lightning line would come out twice.
    """
    if logging.getLogger().hasHandlers():
        logging.getLogger("lightning").handlers.clear()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, QuietLightningNotices) for f in rank_zero.filters):
        rank_zero.addFilter(QuietLightningNotices())


class QuietLightningNotices(logging.Filter):
    """Drops Lightning notices that describe this project's own set-up, not the run.

    "Trainer already configured with model summary callbacks: ... Skipping setting a default
    `ModelSummary` callback." is printed because conf/callbacks/default.yaml brings its own
    one-line summary (engine/callbacks.py); every job of a sweep would print it.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Trainer already configured with model summary")


def user_message(err: UserError) -> str:
    """The error's sentence, also when a DataLoader worker wrapped it in a traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised from a worker: keep only the final line
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


# A multirun job that stopped on a user's mistake leaves its sentence here, in its own output
# directory; the sweep summary lists it (sweep/summary.py).
ERROR_FILE = "error.txt"


def run_task(task: Callable[[DictConfig], T], cfg: DictConfig) -> T | None:
    """Run task(cfg); a UserError ends the program with its one sentence and exit code 1.

    In a multirun the job instead records the sentence in its `error.txt` and returns None:
    the other jobs still run, the sweep summary lists the failed ones, and the multirun then
    exits 1 with a one-line count (sweep/callback.py). A Hydra job failure would end the
    multirun with Hydra's traceback; bugs (other exceptions) still do, on purpose.
    """
    try:
        return task(cfg)
    except UserError as err:
        message = user_message(err)
        log.error(message)
        if in_multirun():
            record_job_error(message)
            return None
        raise SystemExit(1) from None
    except Stopped as stop:  # a signal: the whole program stops, a multirun too
        log.warning(str(stop))
        raise SystemExit(stop.exit_code) from None


def record_job_error(message: str) -> None:
    """Write the job's error sentence into its output directory (error.txt), unless the
    directory holds a finished run (a multirun started again in the same folder): that run's
    files stay as they are."""
    from hydra.core.hydra_config import HydraConfig

    from tb_lightning.core.atomic import atomic_write

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if not (output_dir / "metrics.json").exists():
        atomic_write(output_dir / ERROR_FILE, message + "\n")


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def instantiate_config(config: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, letting our one-sentence UserErrors through unwrapped."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a callbacks/logger group that has a `_target_`."""
    if not group:
        return []
    return [instantiate_config(entry) for entry in group.values() if entry and "_target_" in entry]


def written_files(output_dir: Path) -> str:
    """What a run folder holds, for its last log line: the run's lock (`.run.lock`, removed as
    the process ends) is no output of the run."""
    from tb_lightning.core.run_lock import LOCK_NAME

    return ", ".join(sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_NAME))
