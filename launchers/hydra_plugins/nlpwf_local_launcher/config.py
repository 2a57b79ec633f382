from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class LocalLauncherConf:
    _target_: str = "hydra_plugins.nlpwf_local_launcher.local_launcher.NlpwfLocalLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="nlpwf_local", node=LocalLauncherConf, provider="nlpwf")
