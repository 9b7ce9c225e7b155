"""fedhosp: federated, differentially private medical imaging across hospital sites."""

__version__ = "0.1.0"
