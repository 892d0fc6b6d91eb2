"""Reports: what a transfer method trains."""

from .params import ParameterReport, parameter_report

__all__ = ["ParameterReport", "parameter_report"]
