"""fedhosp: federated, differentially private medical imaging across hospital sites."""

from common import flower_env

__version__ = "0.1.0"
flower_env.apply()  # before any Flower import: every `fedhosp` command runs Flower in this process or starts it
