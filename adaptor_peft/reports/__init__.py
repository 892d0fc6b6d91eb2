"""Reports: what a transfer method trains, and what many runs scored."""

from .paired import PairedDifference, paired_difference
from .params import ParameterReport, parameter_report
from .results import Summary, collect_results, combine, summarize, write_summary

__all__ = [
    "PairedDifference",
    "ParameterReport",
    "Summary",
    "collect_results",
    "combine",
    "paired_difference",
    "parameter_report",
    "summarize",
    "write_summary",
]
