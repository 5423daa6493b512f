"""Tests of ``prefill_service``."""
