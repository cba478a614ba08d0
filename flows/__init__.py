"""Prefect flows over the fin_tasks library (the library itself never imports prefect)."""
