"""Fine-tune a language model: `python launch.py [model=...] [method=...] [parallel=...]`.

With no argument it trains the bundled tiny model on the bundled task on this machine.
`python launch.py --cfg job` prints the composed config; `-m` runs sweeps.
"""
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from launch.config import register_resolvers

register_resolvers()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def app(cfg: DictConfig) -> int:
    from launch.command_line import composed_refusal

    code = composed_refusal(cfg)  # an unknown key or a credential: refused before the torch import
    if not code:
        from launch.main import main

        code = main(cfg, HydraConfig.get().runtime.output_dir)
    if code and HydraConfig.get().mode.name != "MULTIRUN":
        sys.exit(code)
    return code


if __name__ == "__main__":
    from launch.command_line import refuse_or_continue

    refuse_or_continue(sys.argv[1:])  # a credential or an unusable run dir, before Hydra prints or writes
    app()
