"""Reports: what a transfer method trains, and what many runs scored."""

from .params import ParameterReport, parameter_report
from .results import Summary, collect_results, combine, summarize, write_summary

__all__ = ["ParameterReport", "Summary", "collect_results", "combine", "parameter_report", "summarize", "write_summary"]
