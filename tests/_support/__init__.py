"""Helpers of the test suite, one module per kind of helper (test-bed clients and servers,
framework models and tools, config writers, waiting and scraping); imported as
`tests._support.<module>` (the repository root is on the path through pytest's `pythonpath`).
Fixtures shared by several folders are in `fixtures.py`; no conftest is imported as a module.
"""
