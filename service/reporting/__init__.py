"""Service-side telemetry reporting: stream per-request SpeculativeMetrics to the sidecar.

from service.reporting import MetricsReporter
"""

from service.reporting.reporter import MetricsReporter, ReporterStats, encode_report_request

__all__ = ["MetricsReporter", "ReporterStats", "encode_report_request"]
