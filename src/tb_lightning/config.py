"""Where the config tree lives, and the OmegaConf resolvers the configs use."""

from pathlib import Path

from omegaconf import OmegaConf

from tb_lightning.resume import resume_run_dir

# The package is installed editable from the checkout (`make install`), so the project root is
# two levels above src/tb_lightning/.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """Register `${tb_project_root:}` used by conf/paths/default.yaml (idempotent)."""
    if not OmegaConf.has_resolver("tb_project_root"):
        OmegaConf.register_new_resolver("tb_project_root", lambda: str(PROJECT_ROOT))
    # conf/hydra/default.yaml: a resumed training run continues in its own directory.
    if not OmegaConf.has_resolver("tb_run_dir"):
        OmegaConf.register_new_resolver("tb_run_dir", resume_run_dir)


register_resolvers()
