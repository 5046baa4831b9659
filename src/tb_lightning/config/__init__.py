"""Where the config tree lives, and the OmegaConf resolvers the configs use."""

from pathlib import Path

from omegaconf import OmegaConf

from tb_lightning.core.run_dirs import invocation_subdir, resume_run_dir

# The package is installed editable from the checkout (`make install`), so the project root is
# three levels above src/tb_lightning/config/.
PROJECT_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """Register `${tb_project_root:}` (conf/paths) and `${sweep_run_name:}` (conf/logger)."""
    if not OmegaConf.has_resolver("tb_project_root"):
        OmegaConf.register_new_resolver("tb_project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("sweep_run_name"):
        # Imported on use: the resolver needs Hydra's job state, not at import time.
        def sweep_run_name() -> str:
            from tb_lightning.sweep.naming import sweep_run_name as name

            return name()

        OmegaConf.register_new_resolver("sweep_run_name", sweep_run_name)
    # conf/hydra/default.yaml: a resumed training run continues in its own directory (only when
    # its config is the run's), and never overwrites the run's own .hydra/.
    if not OmegaConf.has_resolver("tb_run_dir"):
        OmegaConf.register_new_resolver("tb_run_dir", resume_run_dir)
    if not OmegaConf.has_resolver("tb_hydra_subdir"):
        OmegaConf.register_new_resolver("tb_hydra_subdir", invocation_subdir)


register_resolvers()
