"""nlpwf: fine-tune transformer encoders for text classification and regression (single texts or
pairs; classes or a score) on CPU clusters."""
from pathlib import Path

__version__ = "0.1.0"

# conf/ sits beside the package in the source tree; the CLI, the launchers and the Azure
# snapshot all find it from here.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
