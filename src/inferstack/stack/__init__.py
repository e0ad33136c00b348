"""The local supervisor behind `inferstack up`: engines, gateway, dashboard and Prometheus as children."""
