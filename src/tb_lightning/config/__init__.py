"""Where the config tree lives, and the OmegaConf resolvers the configs use."""

from pathlib import Path

from omegaconf import OmegaConf

from tb_lightning.core.run_dirs import invocation_subdir, resume_run_dir

# The package is installed editable from the checkout (`make install`), so the project root is
# three levels above src/tb_lightning/config/.
PROJECT_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """Register `${tb_project_root:}` (conf/paths) and `${tb_run_name:...}` (conf/logger)."""
    if not OmegaConf.has_resolver("tb_project_root"):
        OmegaConf.register_new_resolver("tb_project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("tb_run_name"):
        # Imported on use: the resolver needs Hydra's job state, not at import time.
        def tb_run_name(output_dir: str | None = None, ckpt_path: str | None = None) -> str:
            from tb_lightning.sweep.naming import dashboard_run_name

            return dashboard_run_name(output_dir, ckpt_path)

        OmegaConf.register_new_resolver("tb_run_name", tb_run_name)
    # conf/hydra/default.yaml: a resumed training run continues in its own directory (only when
    # its config is the run's), and never overwrites the run's own .hydra/.
    if not OmegaConf.has_resolver("tb_run_dir"):
        OmegaConf.register_new_resolver("tb_run_dir", resume_run_dir)
    if not OmegaConf.has_resolver("tb_hydra_subdir"):
        OmegaConf.register_new_resolver("tb_hydra_subdir", invocation_subdir)


register_resolvers()
