"""The embedded real-data demo (``ecif-fast demo``)."""
from .pipeline import QUICK, DemoConfig, run_demo

__all__ = ["DemoConfig", "QUICK", "run_demo"]
